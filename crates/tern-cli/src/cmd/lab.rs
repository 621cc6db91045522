//! `tern lab up|down|status`: two sites and a mirror daemon per site on
//! loopback under one folder, peered with a bootstrap token, so mirroring
//! can be tried in a minute. Everything it starts is recorded in
//! `<dir>/pids` and stopped by `down`.

use crate::ctx::{Result, invalid};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tern_client::ClientError;
use tern_types::ErrorKind;

const SITES: [(&str, &str); 2] = [("site-a", "127.0.0.1:10809"), ("site-b", "127.0.0.1:10810")];
/// Per site: ternd's metrics and status page, the mirror daemon's metrics.
fn http_ports(site: &str) -> (&'static str, &'static str) {
    if site == "site-a" {
        ("127.0.0.1:9284", "127.0.0.1:9283")
    } else {
        ("127.0.0.1:9286", "127.0.0.1:9285")
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|e| invalid(format!("cannot find this program: {e}")))?;
    let p = exe
        .parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if p.exists() {
        Ok(p)
    } else {
        Err(ClientError::new(
            ErrorKind::NotFound,
            format!(
                "{name} is not next to tern ({}): build the workspace",
                p.display()
            ),
        ))
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn pids(dir: &Path) -> Vec<(String, u32)> {
    std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .and_then(|(n, p)| p.parse().ok().map(|p| (n.to_string(), p)))
        })
        .collect()
}

fn spawn(dir: &Path, name: &str, program: &Path, args: &[&str], conf: &Path) -> Result<u32> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .map_err(|e| invalid(e.to_string()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("TERN_CONF_DIR", conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| invalid(e.to_string()))?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd
        .spawn()
        .map_err(|e| invalid(format!("cannot start {}: {e}", program.display())))?;
    let pid = child.id();
    std::mem::forget(child);
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("pids"))
        .map_err(|e| invalid(e.to_string()))?;
    writeln!(f, "{name} {pid}").map_err(|e| invalid(e.to_string()))?;
    Ok(pid)
}

fn tern(conf: &Path, cluster: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(sibling("tern")?)
        .env("TERN_CONF_DIR", conf)
        .arg("--cluster")
        .arg(cluster)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| invalid(e.to_string()))?;
    if !o.status.success() {
        return Err(ClientError::new(
            ErrorKind::Internal,
            format!(
                "tern --cluster {cluster} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}

pub fn run(action: &str, dir: &Path) -> Result<()> {
    let dir = std::path::absolute(dir).map_err(|e| invalid(e.to_string()))?;
    let conf = dir.join("conf");
    match action {
        "up" => up(&dir, &conf),
        "down" => down(&dir),
        _ => status(&dir, &conf),
    }
}

fn up(dir: &Path, conf: &Path) -> Result<()> {
    if pids(dir).iter().any(|(_, p)| alive(*p)) {
        eprintln!(
            "the lab in {} is already running; `tern lab status` shows it",
            dir.display()
        );
        return status(dir, conf);
    }
    let _ = std::fs::remove_file(dir.join("pids"));
    std::fs::create_dir_all(conf).map_err(|e| invalid(e.to_string()))?;
    let ternd = sibling("ternd")?;
    for (site, nbd) in SITES {
        let data = dir.join(site);
        let _ = std::fs::remove_file(data.join("ternd.addr"));
        let listen = std::fs::read_to_string(data.join("api.port"))
            .map(|p| format!("127.0.0.1:{}", p.trim()))
            .unwrap_or("127.0.0.1:0".into());
        let d = data.display().to_string();
        spawn(
            dir,
            &format!("{site}.ternd"),
            &ternd,
            &[
                "--data",
                &d,
                "--cluster",
                site,
                "--listen",
                &listen,
                "--nbd-listen",
                nbd,
                "--http-listen",
                http_ports(site).0,
            ],
            conf,
        )?;
        let end = Instant::now() + Duration::from_secs(20);
        while !data.join("ternd.addr").exists() {
            if Instant::now() > end {
                return Err(ClientError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "{site} did not start: see {}",
                        dir.join(format!("{site}.ternd.log")).display()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Keep the port across restarts so configs and peers stay valid.
        if let Ok(a) = std::fs::read_to_string(data.join("ternd.addr"))
            && let Some((_, port)) = a.trim().rsplit_once(':')
        {
            let _ = std::fs::write(data.join("api.port"), port);
        }
        let _ = tern(conf, site, &["pool", "create", "rbd"]);
        tern(conf, site, &["pool", "init", "rbd"])?;
        tern(
            conf,
            site,
            &[
                "mirror",
                "pool",
                "enable",
                "rbd",
                "image",
                "--site-name",
                site,
            ],
        )?;
        let ring = conf.join(format!("{site}.client.rbd-mirror.keyring"));
        let r = ring.display().to_string();
        tern(
            conf,
            site,
            &[
                "auth",
                "get-or-create",
                "client.rbd-mirror",
                "mon",
                "profile rbd-mirror",
                "osd",
                "profile rbd",
                "-o",
                &r,
            ],
        )?;
    }
    let token = tern(
        conf,
        "site-a",
        &[
            "mirror",
            "pool",
            "peer",
            "bootstrap",
            "create",
            "--site-name",
            "site-a",
            "rbd",
        ],
    )?;
    let tf = dir.join("site-a.token");
    std::fs::write(&tf, token.trim()).map_err(|e| invalid(e.to_string()))?;
    let t = tf.display().to_string();
    tern(
        conf,
        "site-b",
        &[
            "mirror",
            "pool",
            "peer",
            "bootstrap",
            "import",
            "--site-name",
            "site-b",
            "--direction",
            "rx-tx",
            "rbd",
            &t,
        ],
    )?;
    let mirror = sibling("tern-mirror")?;
    for (site, _) in SITES {
        spawn(
            dir,
            &format!("{site}.tern-mirror"),
            &mirror,
            &[
                "--cluster",
                site,
                "--id",
                "rbd-mirror",
                "--metrics-listen",
                http_ports(site).1,
            ],
            conf,
        )?;
    }
    println!(
        "tern lab is up in {dir}: site-a and site-b on loopback, peered rx-tx on pool rbd, a mirror daemon each.

Try (the lab's configs are in {conf}):
  export TERN_CONF_DIR={conf}
  tern --cluster site-a create rbd/vol1 --size 1G
  tern --cluster site-a mirror image enable rbd/vol1 snapshot
  qemu-io -f raw -c 'write -P 0xab 0 64M' nbd://127.0.0.1:10809/rbd/vol1
  tern --cluster site-a mirror image snapshot rbd/vol1
  tern --cluster site-b mirror image status rbd/vol1
  tern --cluster site-b mirror pool status rbd --verbose
  status pages: http://127.0.0.1:9284/ (site-a), http://127.0.0.1:9286/ (site-b)
  metrics: ternd :9284/:9286, tern-mirror :9283/:9285 (/metrics)
  tern --cluster site-a mirror image demote rbd/vol1 && tern --cluster site-b mirror image promote rbd/vol1

Stop it with: tern lab down --dir {dir}",
        dir = dir.display(),
        conf = conf.display()
    );
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    let list = pids(dir);
    if list.is_empty() {
        println!("no lab running in {}", dir.display());
        return Ok(());
    }
    // Mirror daemons first, then sites.
    let mut order = list.clone();
    order.sort_by_key(|(n, _)| !n.ends_with("tern-mirror"));
    for (name, pid) in &order {
        if alive(*pid) {
            // SAFETY: signalling processes this lab started.
            unsafe { libc_kill(*pid as i32, 15) };
            let end = Instant::now() + Duration::from_secs(10);
            while alive(*pid) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(*pid) {
                unsafe { libc_kill(*pid as i32, 9) };
            }
            println!("stopped {name} ({pid})");
        }
    }
    let _ = std::fs::remove_file(dir.join("pids"));
    Ok(())
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn status(dir: &Path, conf: &Path) -> Result<()> {
    let list = pids(dir);
    if list.is_empty() {
        println!("no lab in {}: start one with `tern lab up`", dir.display());
        return Ok(());
    }
    for (name, pid) in &list {
        println!(
            "{name:<20} pid {pid:<8} {}",
            if alive(*pid) {
                "running"
            } else {
                "not running"
            }
        );
    }
    for (site, nbd) in SITES {
        if let Ok(s) = tern(conf, site, &["mirror", "pool", "status", "rbd"]) {
            println!("\n{site} (nbd://{nbd}):\n{}", s.trim_end());
        }
    }
    Ok(())
}
