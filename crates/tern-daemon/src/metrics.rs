//! The Prometheus side both daemons share: the `/metrics` route and label
//! values that survive any name.

use axum::response::IntoResponse;
use std::future::Future;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `GET` route answering with the page `render` writes.
pub fn route<F, Fut>(render: F) -> axum::routing::MethodRouter
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    axum::routing::get(move || {
        let page = render();
        async move {
            (
                [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                page.await,
            )
                .into_response()
        }
    })
}

pub type Labels = Vec<(String, LabelValue)>;

/// A label value as the text format needs it: prometheus-client 0.24
/// writes values verbatim, so a name holding `"`, `\\` or a line feed would
/// break the whole page; this one goes through the library's encoder
/// escaped.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelValue(pub String);

impl prometheus_client::encoding::EncodeLabelValue for LabelValue {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&tern_types::text::prometheus_label_value(&self.0))
    }
}

impl From<&str> for LabelValue {
    fn from(s: &str) -> Self {
        LabelValue(s.to_string())
    }
}

impl From<String> for LabelValue {
    fn from(s: String) -> Self {
        LabelValue(s)
    }
}

impl From<&String> for LabelValue {
    fn from(s: &String) -> Self {
        LabelValue(s.clone())
    }
}

/// `entries_behind_primary` from a replayer's "replaying, {json}" status
/// description.
pub fn entries_behind(description: &str) -> Option<f64> {
    let j = description.strip_prefix("replaying, ")?;
    let v: serde_json::Value = serde_json::from_str(j).ok()?;
    v.get("entries_behind_primary")?.as_f64()
}
