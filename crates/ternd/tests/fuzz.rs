//! Fuzz target (proptest, bounded, part of the normal suite) for bootstrap
//! tokens, which an operator imports from another site and an attacker may
//! have tampered with: random strings, mutations of the base64 text and of
//! the JSON inside it. No input may panic; a valid token decodes to what
//! was encoded. Prints the inputs tried; `TERN_FUZZ_SCALE=10` runs ten
//! times as many.

use base64::Engine;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tern_types::mutate::{Mutation, apply};
use ternd::mirror::Token;

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(
        (any::<u8>(), any::<usize>(), any::<u64>())
            .prop_map(|(k, a, v)| Mutation::from_parts(k, a, v)),
        0..5,
    )
}

fn token() -> impl Strategy<Value = Token> {
    (
        any::<u128>(),
        "client\\.[a-z0-9-]{1,12}",
        "[A-Za-z0-9+/]{8,40}={0,2}",
        proptest::collection::vec(("127\\.0\\.0\\.[0-9]{1,3}", 1u16..), 1..3),
        "[a-z][a-z0-9-]{0,15}",
        "[0-9a-f]{64}",
        "[a-z]{1,8}",
        any::<u128>(),
    )
        .prop_map(
            |(fsid, client_id, key, hosts, site, fp, pool, uuid)| Token {
                fsid: uuid::Uuid::from_u128(fsid).to_string(),
                client_id,
                key,
                mon_host: hosts
                    .iter()
                    .map(|(h, p)| format!("{h}:{p}"))
                    .collect::<Vec<_>>()
                    .join(","),
                site_name: site,
                tls_fingerprint: fp,
                pool,
                mirror_uuid: uuid::Uuid::from_u128(uuid).to_string(),
            },
        )
}

#[test]
fn fuzz_bootstrap_tokens() {
    let scale: u32 = std::env::var("TERN_FUZZ_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let n = 20_000 * scale.max(1);
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(token(), mutations(), any::<String>()), |(t, m, noise)| {
            let text = t.encode();
            let back = Token::decode(&text).expect("a valid token decodes");
            prop_assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&t).unwrap()
            );
            // The text as pasted, damaged.
            let bad = apply(text.as_bytes(), &m);
            let _ = Token::decode(&String::from_utf8_lossy(&bad));
            // The JSON inside, damaged, then properly encoded.
            let json = serde_json::to_vec(&t).unwrap();
            let _ = Token::decode(&b64.encode(apply(&json, &m)));
            let _ = Token::decode(&noise);
            let _ = Token::decode(&b64.encode(noise.as_bytes()));
            Ok(())
        })
        .unwrap();
    eprintln!("fuzz bootstrap tokens: {n} inputs, 0 crashes");
}
