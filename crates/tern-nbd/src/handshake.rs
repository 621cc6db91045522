//! Fixed newstyle handshake and option haggling.
//!
//! [`OptionState::step`] is the synchronous part: given one option it decides
//! what to do (reply, ask the export namespace, upgrade to TLS, close) and is
//! unit-tested without sockets. [`negotiate`] is the thin async shell that
//! performs those decisions.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};

use crate::device::{BlockDevice, Exports, MetaContext};
use crate::server::{BoxIo, NbdError, ServerConfig};
use crate::wire::*;

/// Option payloads up to this size are read into memory and parsed.
const MAX_OPTION_DATA: u32 = 1024 * 1024;
/// Larger payloads up to this size are skipped and refused with NBD_REP_ERR_TOO_BIG;
/// beyond it the client is treated as hostile and disconnected.
const MAX_OPTION_SKIP: u32 = 64 * 1024 * 1024;

/// What the handshake settled on, carried into transmission.
pub(crate) struct Negotiated {
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    pub structured: bool,
    pub contexts: Vec<(u32, MetaContext)>,
}

/// What to do with one option. Option replies that need no export lookup are
/// decided entirely here.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send a single reply of this type with this message, keep haggling.
    Reply(u32, String),
    /// ACK, then the client goes away.
    Abort,
    /// ACK, then run the TLS handshake on the same socket.
    StartTls,
    List,
    Info {
        name: String,
        infos: Vec<u16>,
        go: bool,
    },
    Meta {
        name: String,
        queries: Vec<String>,
        set: bool,
    },
    ExportName(String),
    /// Hard disconnect: the option cannot be answered.
    Close(String),
}

/// Per-connection negotiation state.
#[derive(Debug)]
pub(crate) struct OptionState {
    pub tls_available: bool,
    pub require_tls: bool,
    pub tls_active: bool,
    /// The client set NBD_FLAG_C_FIXED_NEWSTYLE; without it TLS is not allowed.
    pub fixed: bool,
    pub no_zeroes: bool,
    pub structured: bool,
    /// (resolved export name, selected contexts with their ids).
    pub meta: Option<(String, Vec<(u32, MetaContext)>)>,
}

impl OptionState {
    pub fn new(cfg: &ServerConfig, client_flags: u32) -> Self {
        OptionState {
            tls_available: cfg.tls.is_some(),
            require_tls: cfg.require_tls,
            tls_active: false,
            fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            structured: false,
            meta: None,
        }
    }

    fn tls_missing(&self) -> bool {
        self.require_tls && !self.tls_active
    }

    pub fn step(&mut self, option: u32, data: &[u8]) -> Step {
        if option == OPT_EXPORT_NAME {
            if self.tls_missing() {
                // Cannot answer EXPORT_NAME with an error; the spec says hang up.
                return Step::Close("export requested before mandatory TLS".into());
            }
            return match std::str::from_utf8(data) {
                Ok(n) if !n.contains('\0') && n.len() <= MAX_STRING => Step::ExportName(n.into()),
                _ => Step::Close("export name is not a valid string".into()),
            };
        }
        if option == OPT_ABORT {
            return Step::Abort;
        }
        if option == OPT_STARTTLS {
            return if self.tls_active {
                Step::Reply(REP_ERR_INVALID, "TLS is already active".into())
            } else if !self.tls_available || !self.fixed {
                Step::Reply(REP_ERR_UNSUP, "TLS is not configured on this server".into())
            } else if !data.is_empty() {
                Step::Reply(REP_ERR_INVALID, "STARTTLS takes no data".into())
            } else {
                Step::StartTls
            };
        }
        let known = matches!(
            option,
            OPT_LIST
                | OPT_INFO
                | OPT_GO
                | OPT_STRUCTURED_REPLY
                | OPT_LIST_META_CONTEXT
                | OPT_SET_META_CONTEXT
        );
        if !known {
            return Step::Reply(REP_ERR_UNSUP, format!("option {option} is not supported"));
        }
        if self.tls_missing() {
            return Step::Reply(
                REP_ERR_TLS_REQD,
                "this server requires TLS (STARTTLS)".into(),
            );
        }
        match option {
            OPT_LIST if data.is_empty() => Step::List,
            OPT_LIST => Step::Reply(REP_ERR_INVALID, "LIST takes no data".into()),
            OPT_STRUCTURED_REPLY if data.is_empty() => {
                self.structured = true;
                Step::Reply(REP_ACK, String::new())
            }
            OPT_STRUCTURED_REPLY => {
                Step::Reply(REP_ERR_INVALID, "STRUCTURED_REPLY takes no data".into())
            }
            OPT_INFO | OPT_GO => match parse_info_request(data) {
                Ok((name, infos)) => Step::Info {
                    name,
                    infos,
                    go: option == OPT_GO,
                },
                Err(e) => Step::Reply(REP_ERR_INVALID, format!("malformed request: {e}")),
            },
            _ => {
                let set = option == OPT_SET_META_CONTEXT;
                if !self.structured {
                    return Step::Reply(
                        REP_ERR_INVALID,
                        "meta contexts need structured replies first".into(),
                    );
                }
                match parse_meta_context_request(data) {
                    Ok((name, queries)) => Step::Meta { name, queries, set },
                    Err(e) => Step::Reply(REP_ERR_INVALID, format!("malformed request: {e}")),
                }
            }
        }
    }

    /// After STARTTLS everything negotiated in clear text is forgotten, so a
    /// man in the middle cannot have influenced it.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
        self.meta = None;
    }
}

/// Contexts matching `queries`. LIST accepts namespace queries (`base:`, `tern:`)
/// and an empty query list meaning "everything"; SET takes exact names only.
pub(crate) fn match_contexts(
    queries: &[String],
    offered: &[String],
    list: bool,
) -> Vec<MetaContext> {
    let all: Vec<MetaContext> = std::iter::once(MetaContext::BaseAllocation)
        .chain(offered.iter().map(|n| MetaContext::Device(n.clone())))
        .collect();
    if list && queries.is_empty() {
        return all;
    }
    let mut out: Vec<MetaContext> = Vec::new();
    for q in queries {
        for c in &all {
            let hit =
                c.name() == q || (list && q.ends_with(':') && c.name().starts_with(q.as_str()));
            if hit && !out.contains(c) {
                out.push(c.clone());
            }
        }
    }
    out
}

pub(crate) fn transmission_flags(dev: &dyn BlockDevice, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if dev.read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if dev.can_multi_conn() {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    f
}

/// The device the handshake has opened so far. Kept outside [`negotiate`] so the
/// caller can still `close()` it if the handshake is cancelled by shutdown.
#[derive(Default)]
pub(crate) struct OpenDevice {
    pub current: Option<(String, Arc<dyn BlockDevice>)>,
}

impl OpenDevice {
    /// INFO, meta-context options and GO usually name the same export; open it
    /// once and reuse it, closing the previous one if the client switches.
    async fn get(
        &mut self,
        exports: &dyn Exports,
        name: &str,
    ) -> Result<Arc<dyn BlockDevice>, crate::DeviceError> {
        if let Some((n, d)) = &self.current
            && n == name
        {
            return Ok(d.clone());
        }
        self.close().await;
        let d = exports.open(name).await?;
        info!(
            export = name,
            size = d.size(),
            ro = d.read_only(),
            "nbd: export opened"
        );
        self.current = Some((name.to_string(), d.clone()));
        Ok(d)
    }

    pub async fn close(&mut self) {
        if let Some((n, d)) = self.current.take() {
            d.close().await;
            debug!(export = n, "nbd: export closed");
        }
    }
}

pub(crate) enum HandshakeEnd {
    Transmission(BoxIo, Negotiated),
    Closed,
}

fn resolve(exports: &dyn Exports, name: &str) -> String {
    if name.is_empty() {
        exports.default_export().unwrap_or_default()
    } else {
        name.to_string()
    }
}

async fn send(io: &mut BoxIo, bytes: &[u8]) -> Result<(), NbdError> {
    io.write_all(bytes).await.map_err(NbdError::HandshakeIo)?;
    io.flush().await.map_err(NbdError::HandshakeIo)
}

async fn reply(io: &mut BoxIo, option: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
    send(io, &encode_option_reply(option, kind, data)).await
}

/// Runs the handshake to its end: transmission, a soft disconnect, or an error.
pub(crate) async fn negotiate(
    mut io: BoxIo,
    exports: &dyn Exports,
    cfg: &ServerConfig,
    open: &mut OpenDevice,
) -> Result<HandshakeEnd, NbdError> {
    send(&mut io, &encode_greeting()).await?;
    let mut cf = [0u8; 4];
    if let Err(e) = io.read_exact(&mut cf).await {
        return eof_is_close(e);
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::ClientFlags(client_flags));
    }
    let mut st = OptionState::new(cfg, client_flags);
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        if let Err(e) = io.read_exact(&mut hdr).await {
            return eof_is_close(e);
        }
        let (option, len) = parse_option_header(&hdr).map_err(NbdError::Wire)?;
        if len > MAX_OPTION_DATA {
            if len > MAX_OPTION_SKIP || option == OPT_EXPORT_NAME {
                return Err(NbdError::OptionTooLarge { option, len });
            }
            let skipped =
                tokio::io::copy(&mut (&mut io).take(u64::from(len)), &mut tokio::io::sink())
                    .await
                    .map_err(NbdError::HandshakeIo)?;
            if skipped != u64::from(len) {
                return Ok(HandshakeEnd::Closed);
            }
            reply(&mut io, option, REP_ERR_TOO_BIG, b"option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        if let Err(e) = io.read_exact(&mut data).await {
            return eof_is_close(e);
        }
        let step = st.step(option, &data);
        debug!(option, ?step, "nbd: option");
        match step {
            Step::Reply(kind, msg) => reply(&mut io, option, kind, msg.as_bytes()).await?,
            Step::Abort => {
                // The client may already be gone; a failed ACK is not an error.
                let _ = reply(&mut io, option, REP_ACK, &[]).await;
                let _ = io.shutdown().await;
                return Ok(HandshakeEnd::Closed);
            }
            Step::Close(why) => return Err(NbdError::Refused(why)),
            Step::StartTls => {
                reply(&mut io, option, REP_ACK, &[]).await?;
                let acceptor = cfg.tls.clone().expect("step() checked tls_available");
                let tls = acceptor.accept(io).await.map_err(NbdError::Tls)?;
                io = Box::new(tls);
                st.tls_started();
                info!("nbd: TLS established");
            }
            Step::List => {
                for (name, desc) in exports.list().await {
                    reply(
                        &mut io,
                        option,
                        REP_SERVER,
                        &encode_rep_server(&name, &desc),
                    )
                    .await?;
                }
                reply(&mut io, option, REP_ACK, &[]).await?;
            }
            Step::Meta { name, queries, set } => {
                let name = resolve(exports, &name);
                let dev = match open.get(exports, &name).await {
                    Ok(d) => d,
                    Err(e) => {
                        reply(&mut io, option, REP_ERR_UNKNOWN, e.message.as_bytes()).await?;
                        continue;
                    }
                };
                let found = match_contexts(&queries, &dev.meta_contexts(), !set);
                let mut selected = Vec::new();
                for (i, c) in found.into_iter().enumerate() {
                    // LIST ids are "reserved, SHOULD be zero".
                    let id = if set { i as u32 + 1 } else { 0 };
                    reply(
                        &mut io,
                        option,
                        REP_META_CONTEXT,
                        &encode_rep_meta_context(id, c.name()),
                    )
                    .await?;
                    selected.push((id, c));
                }
                if set {
                    st.meta = Some((name, selected));
                }
                reply(&mut io, option, REP_ACK, &[]).await?;
            }
            Step::Info { name, infos, go } => {
                let resolved = resolve(exports, &name);
                let dev = match open.get(exports, &resolved).await {
                    Ok(d) => d,
                    Err(e) => {
                        let msg = format!("export {name:?}: {}", e.message);
                        reply(&mut io, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                        continue;
                    }
                };
                let flags = transmission_flags(dev.as_ref(), st.structured);
                reply(
                    &mut io,
                    option,
                    REP_INFO,
                    &encode_info_export(dev.size(), flags),
                )
                .await?;
                // Always sent: min 1 means "no alignment needed" and max tells the
                // client where EINVAL starts.
                let bs = encode_info_block_size(1, PREFERRED_BLOCK, MAX_PAYLOAD);
                reply(&mut io, option, REP_INFO, &bs).await?;
                if infos.contains(&INFO_NAME) {
                    let b = encode_info_string(INFO_NAME, &resolved);
                    reply(&mut io, option, REP_INFO, &b).await?;
                }
                if infos.contains(&INFO_DESCRIPTION)
                    && let Some((_, d)) = exports
                        .list()
                        .await
                        .into_iter()
                        .find(|(n, _)| *n == resolved)
                    && !d.is_empty()
                {
                    let b = encode_info_string(INFO_DESCRIPTION, &d);
                    reply(&mut io, option, REP_INFO, &b).await?;
                }
                reply(&mut io, option, REP_ACK, &[]).await?;
                if go {
                    return Ok(HandshakeEnd::Transmission(
                        io,
                        finish(&mut st, resolved, dev),
                    ));
                }
            }
            Step::ExportName(name) => {
                let resolved = resolve(exports, &name);
                let dev = open
                    .get(exports, &resolved)
                    .await
                    .map_err(|e| NbdError::Refused(format!("export {name:?}: {}", e.message)))?;
                let flags = transmission_flags(dev.as_ref(), st.structured);
                send(
                    &mut io,
                    &encode_export_name_reply(dev.size(), flags, st.no_zeroes),
                )
                .await?;
                return Ok(HandshakeEnd::Transmission(
                    io,
                    finish(&mut st, resolved, dev),
                ));
            }
        }
    }
}

fn finish(st: &mut OptionState, name: String, device: Arc<dyn BlockDevice>) -> Negotiated {
    // Contexts chosen for another export do not apply to this one.
    let contexts = match st.meta.take() {
        Some((n, c)) if n == name => c,
        _ => Vec::new(),
    };
    Negotiated {
        name,
        device,
        structured: st.structured,
        contexts,
    }
}

fn eof_is_close(e: std::io::Error) -> Result<HandshakeEnd, NbdError> {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Ok(HandshakeEnd::Closed)
    } else {
        Err(NbdError::HandshakeIo(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tls: bool) -> ServerConfig {
        ServerConfig {
            require_tls: tls,
            ..ServerConfig::default()
        }
    }

    #[test]
    fn unknown_option_is_unsup_not_close() {
        let mut st = OptionState::new(&cfg(false), FLAG_C_FIXED_NEWSTYLE);
        assert!(matches!(
            st.step(4242, b"junk"),
            Step::Reply(REP_ERR_UNSUP, _)
        ));
        assert!(matches!(st.step(4, &[]), Step::Reply(REP_ERR_UNSUP, _)));
    }

    #[test]
    fn starttls_without_tls_config_is_unsup() {
        let mut st = OptionState::new(&cfg(false), FLAG_C_FIXED_NEWSTYLE);
        assert!(matches!(
            st.step(OPT_STARTTLS, &[]),
            Step::Reply(REP_ERR_UNSUP, _)
        ));
    }

    #[test]
    fn forced_tls_refuses_everything_but_starttls_and_abort() {
        let mut st = OptionState::new(&cfg(true), FLAG_C_FIXED_NEWSTYLE);
        st.tls_available = true;
        for opt in [
            OPT_LIST,
            OPT_GO,
            OPT_INFO,
            OPT_STRUCTURED_REPLY,
            OPT_SET_META_CONTEXT,
        ] {
            assert!(
                matches!(st.step(opt, &[]), Step::Reply(REP_ERR_TLS_REQD, _)),
                "{opt}"
            );
        }
        assert!(matches!(st.step(OPT_EXPORT_NAME, b"x"), Step::Close(_)));
        assert_eq!(st.step(OPT_ABORT, &[]), Step::Abort);
        assert_eq!(st.step(OPT_STARTTLS, &[]), Step::StartTls);
        st.tls_started();
        assert_eq!(st.step(OPT_LIST, &[]), Step::List);
        assert!(matches!(
            st.step(OPT_STARTTLS, &[]),
            Step::Reply(REP_ERR_INVALID, _)
        ));
    }

    #[test]
    fn tls_resets_clear_text_negotiation() {
        let mut st = OptionState::new(&cfg(false), FLAG_C_FIXED_NEWSTYLE);
        st.tls_available = true;
        assert_eq!(
            st.step(OPT_STRUCTURED_REPLY, &[]),
            Step::Reply(REP_ACK, String::new())
        );
        assert!(st.structured);
        st.tls_started();
        assert!(!st.structured);
    }

    #[test]
    fn meta_needs_structured() {
        let mut st = OptionState::new(&cfg(false), FLAG_C_FIXED_NEWSTYLE);
        let data = [0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            st.step(OPT_SET_META_CONTEXT, &data),
            Step::Reply(REP_ERR_INVALID, _)
        ));
        st.step(OPT_STRUCTURED_REPLY, &[]);
        assert!(matches!(
            st.step(OPT_SET_META_CONTEXT, &data),
            Step::Meta { set: true, .. }
        ));
        assert!(matches!(
            st.step(OPT_LIST_META_CONTEXT, &data[..5]),
            Step::Reply(REP_ERR_INVALID, _)
        ));
    }

    #[test]
    fn malformed_go_is_invalid() {
        let mut st = OptionState::new(&cfg(false), FLAG_C_FIXED_NEWSTYLE);
        assert!(matches!(
            st.step(OPT_GO, &[0, 0, 0, 9]),
            Step::Reply(REP_ERR_INVALID, _)
        ));
        assert!(matches!(
            st.step(OPT_LIST, &[1]),
            Step::Reply(REP_ERR_INVALID, _)
        ));
    }

    #[test]
    fn context_matching() {
        let offered = vec![
            "tern:changed-since:a".to_string(),
            "tern:changed-since:b".to_string(),
        ];
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(match_contexts(&[], &offered, true).len(), 3);
        assert_eq!(match_contexts(&[], &offered, false).len(), 0);
        assert_eq!(match_contexts(&q(&["tern:"]), &offered, true).len(), 2);
        assert_eq!(match_contexts(&q(&["tern:"]), &offered, false).len(), 0);
        assert_eq!(
            match_contexts(
                &q(&["base:allocation", "tern:changed-since:b", "base:allocation"]),
                &offered,
                false
            ),
            vec![
                MetaContext::BaseAllocation,
                MetaContext::Device("tern:changed-since:b".into())
            ]
        );
        assert!(match_contexts(&q(&["qemu:dirty-bitmap:x"]), &offered, false).is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        #[test]
        fn step_never_panics(
            steps in proptest::collection::vec(
                (0u32..14, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)),
                1..10,
            ),
            tls: bool,
        ) {
            let mut st = OptionState::new(&cfg(tls), FLAG_C_FIXED_NEWSTYLE);
            for (opt, data) in steps {
                let _ = st.step(opt, &data);
            }
        }
    }
}
