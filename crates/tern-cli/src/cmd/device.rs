//! `tern device map|unmap|list`: a real block device on a tern image.
//!
//! With the kernel's `nbd` module and `nbd-client`, the image is attached as
//! /dev/nbdN. Without them (as on machines with no loadable modules) it is
//! attached through `nbdfuse`, which presents the NBD export as a file on a
//! FUSE mount, and a loop device over that file: the user still gets a
//! /dev/loopN that carries a filesystem. Mappings are recorded in
//! `<state dir>/devices.json` so `unmap` and `list` work from any shell.

use crate::cli::DeviceCmd;
use crate::ctx::{Ctx, Result, invalid};
use crate::out::table;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tern_client::ClientError;
use tern_types::{ErrorKind, ImageSpec};

#[derive(Serialize, Deserialize, Clone)]
struct Mapping {
    device: String,
    spec: String,
    uri: String,
    read_only: bool,
    /// "loop+nbdfuse" or "nbd"
    kind: String,
    mountpoint: Option<String>,
    pid: Option<u32>,
}

fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TERN_STATE_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } == 0 {
        return PathBuf::from("/run/tern");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("tern"),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/state/tern")
        }
    }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn load(dir: &Path) -> Vec<Mapping> {
    std::fs::read_to_string(dir.join("devices.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn save(dir: &Path, m: &[Mapping]) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
    let tmp = dir.join("devices.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(m).expect("json"))
        .and_then(|_| std::fs::rename(&tmp, dir.join("devices.json")))
        .map_err(|e| invalid(format!("cannot write {}: {e}", dir.display())))
}

fn have(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(bin).is_file()
        || Path::new("/sbin").join(bin).is_file()
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClientError::new(ErrorKind::Unavailable, format!("{what}: {e}")))?;
    if !o.status.success() {
        return Err(ClientError::new(
            ErrorKind::Internal,
            format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

pub async fn run_cmd(ctx: &Ctx, cmd: DeviceCmd) -> Result<()> {
    let dir = state_dir();
    match cmd {
        DeviceCmd::Map { spec, read_only } => {
            let s = ImageSpec::parse(&spec)?;
            let c = ctx.connect().await?;
            // Fail early, with the site's words, on an unknown image or snapshot.
            c.image().info(&s).await?;
            let st = c.site().status().await?;
            if st.nbd_endpoint.is_empty() {
                return Err(ClientError::new(
                    ErrorKind::Unavailable,
                    "the site serves no NBD (ternd --nbd-listen off): start it with an NBD listener",
                ));
            }
            let uri = format!("nbd://{}/{}", st.nbd_endpoint, s);
            let ro = read_only || s.snap.is_some();
            let mut maps = load(&dir);
            let m = if Path::new("/sys/module/nbd").exists() && have("nbd-client") {
                map_kernel(&st.nbd_endpoint, &s.to_string(), ro)?
            } else if have("nbdfuse") && have("losetup") && Path::new("/dev/fuse").exists() {
                map_fuse(&dir, &uri, &s.to_string(), ro)?
            } else {
                return Err(ClientError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "no way to make a block device here: neither the kernel nbd module with nbd-client \
                         nor nbdfuse + losetup + /dev/fuse is available. Use the export directly: {uri}"
                    ),
                ));
            };
            println!("{}", m.device);
            maps.push(m);
            save(&dir, &maps)?;
        }
        DeviceCmd::Unmap { target } => {
            let mut maps = load(&dir);
            let pos = maps
                .iter()
                .position(|m| m.device == target || m.spec == target)
                .ok_or_else(|| {
                    ClientError::new(
                        ErrorKind::NotFound,
                        format!("'{target}' is not mapped (see `tern device list`)"),
                    )
                })?;
            let m = maps[pos].clone();
            unmap(&m)?;
            maps.remove(pos);
            save(&dir, &maps)?;
        }
        DeviceCmd::List => {
            let maps = load(&dir);
            if ctx.json() {
                ctx.print_json(&json!(maps));
            } else if !maps.is_empty() {
                let rows: Vec<Vec<String>> = maps
                    .iter()
                    .map(|m| {
                        vec![
                            m.device.clone(),
                            m.spec.clone(),
                            if m.read_only {
                                "ro".into()
                            } else {
                                "rw".into()
                            },
                            m.kind.clone(),
                            m.uri.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["DEVICE", "IMAGE", "MODE", "VIA", "URI"], &rows)
                );
            }
        }
    }
    Ok(())
}

fn map_kernel(endpoint: &str, spec: &str, ro: bool) -> Result<Mapping> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| invalid("bad NBD endpoint"))?;
    for n in 0..16 {
        let dev = format!("/dev/nbd{n}");
        let busy = std::fs::read_to_string(format!("/sys/block/nbd{n}/pid")).is_ok();
        if !Path::new(&dev).exists() || busy {
            continue;
        }
        let mut cmd = Command::new("nbd-client");
        cmd.args([host, port, &dev, "-N", spec]);
        if ro {
            cmd.arg("-readonly");
        }
        run(&mut cmd, "nbd-client")?;
        return Ok(Mapping {
            device: dev,
            spec: spec.into(),
            uri: format!("nbd://{endpoint}/{spec}"),
            read_only: ro,
            kind: "nbd".into(),
            mountpoint: None,
            pid: None,
        });
    }
    Err(ClientError::new(
        ErrorKind::Busy,
        "every /dev/nbdN is in use",
    ))
}

fn map_fuse(dir: &Path, uri: &str, spec: &str, ro: bool) -> Result<Mapping> {
    let id = format!("{}-{}", spec.replace(['/', '@'], "_"), std::process::id());
    let mnt = dir.join("mnt").join(&id);
    std::fs::create_dir_all(&mnt)
        .map_err(|e| invalid(format!("cannot create {}: {e}", mnt.display())))?;
    let pidfile = dir.join(format!("{id}.pid"));
    let _ = std::fs::remove_file(&pidfile);
    let mut cmd = Command::new("nbdfuse");
    if ro {
        cmd.arg("-r");
    }
    cmd.arg("-P").arg(&pidfile).arg(&mnt).arg(uri);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Its own session, so it outlives this command.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .map_err(|e| ClientError::new(ErrorKind::Unavailable, format!("nbdfuse: {e}")))?;
    let file = mnt.join("nbd");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if pidfile.exists() && file.exists() {
            break;
        }
        // nbdfuse may fork into the background once mounted: only a failed exit is an error.
        if let Ok(Some(st)) = child.try_wait()
            && !st.success()
        {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            let _ = std::fs::remove_dir(&mnt);
            return Err(ClientError::new(
                ErrorKind::Unavailable,
                format!("nbdfuse exited ({st}): {}", err.trim()),
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
            return Err(ClientError::new(
                ErrorKind::Unavailable,
                "nbdfuse did not come up within 15 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .or(Some(child.id()));
    let mut l = Command::new("losetup");
    l.args(["--find", "--show"]);
    if ro {
        l.arg("--read-only");
    }
    l.arg(&file);
    let device = match run(&mut l, "losetup") {
        Ok(d) => d,
        Err(e) => {
            let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
            return Err(e);
        }
    };
    Ok(Mapping {
        device,
        spec: spec.into(),
        uri: uri.into(),
        read_only: ro,
        kind: "loop+nbdfuse".into(),
        mountpoint: Some(mnt.display().to_string()),
        pid,
    })
}

fn unmap(m: &Mapping) -> Result<()> {
    match m.kind.as_str() {
        "nbd" => {
            run(
                Command::new("nbd-client").args(["-d", &m.device]),
                "nbd-client -d",
            )?;
        }
        _ => {
            // Detaching the loop device flushes it; unmounting makes nbdfuse
            // flush and disconnect, which releases the image's lock.
            run(
                Command::new("losetup").args(["-d", &m.device]),
                "losetup -d",
            )?;
            if let Some(mnt) = &m.mountpoint {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let st = Command::new("fusermount3")
                        .arg("-u")
                        .arg(mnt)
                        .stderr(Stdio::null())
                        .status();
                    if st.map(|s| s.success()).unwrap_or(false) || Instant::now() > deadline {
                        break;
                    }
                    // The loop device may take a moment to let go of the file.
                    std::thread::sleep(Duration::from_millis(100));
                }
                if let Some(pid) = m.pid {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                let _ = std::fs::remove_dir(mnt);
            }
        }
    }
    Ok(())
}
