//! `tern`: rbd's and ceph's command grammar for a tern site. Every command
//! takes `--format plain|json`; errors go to stderr with an errno-like exit
//! code (see `tern_types::ErrorKind::exit_code`).

mod cli;
mod cmd;
mod ctx;
mod out;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            // Usage errors exit EINVAL: 2 is ENOENT ("not found") here.
            let text = e.render().to_string();
            eprint!("tern: {}", text.strip_prefix("error: ").unwrap_or(&text));
            return std::process::ExitCode::from(
                tern_types::ErrorKind::InvalidArgument.exit_code() as u8,
            );
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(cmd::run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Messages quote names and answers from outside: show their
            // control and bidi characters as escapes, never raw.
            eprintln!("tern: {}", tern_types::text::escaped_message(&e.message));
            std::process::ExitCode::from(e.kind.exit_code() as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        crate::cli::Cli::command().debug_assert();
    }
}
