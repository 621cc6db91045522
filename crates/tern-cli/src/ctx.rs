use crate::cli::{Format, Global};
use std::io::IsTerminal;
use tern_client::{ClientError, ClusterConfig, SiteClient};
use tern_types::ErrorKind;

pub type Result<T> = std::result::Result<T, ClientError>;

pub fn invalid(msg: impl Into<String>) -> ClientError {
    ClientError::new(ErrorKind::InvalidArgument, msg)
}

pub struct Ctx {
    pub g: Global,
}

impl Ctx {
    pub fn entity(&self) -> String {
        match (&self.g.client_name, &self.g.id) {
            (Some(n), _) => n.clone(),
            (None, Some(id)) => format!("client.{id}"),
            (None, None) => std::env::var("TERN_ID")
                .map(|i| format!("client.{i}"))
                .unwrap_or_else(|_| "client.admin".into()),
        }
    }

    pub async fn connect(&self) -> Result<SiteClient> {
        let conf = ClusterConfig::load(self.g.cluster.as_deref(), self.g.conf.as_deref())?;
        let client = SiteClient::connect(&conf, &self.entity(), self.g.keyring.as_deref())?;
        Ok(client)
    }

    pub fn json(&self) -> bool {
        self.g.format != Format::Plain
    }

    /// Prints a JSON value in the chosen style.
    pub fn print_json(&self, v: &serde_json::Value) {
        if self.g.pretty_format || self.g.format == Format::JsonPretty {
            println!("{}", serde_json::to_string_pretty(v).expect("json"));
        } else {
            println!("{}", serde_json::to_string(v).expect("json"));
        }
    }

    pub fn show_progress(&self) -> bool {
        !self.g.no_progress && std::io::stderr().is_terminal()
    }

    pub fn progress(&self, total: u64, what: &str) -> Option<indicatif::ProgressBar> {
        if !self.show_progress() {
            return None;
        }
        let pb = if total > 0 {
            indicatif::ProgressBar::new(total)
        } else {
            indicatif::ProgressBar::new_spinner()
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg}: {percent:>3}% [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        Some(pb)
    }
}
