//! The writer's side of an exclusive lock: take it, keep renewing it while
//! the writer lives, and stop writing the moment the site says we are fenced.

use crate::{ClientError, SiteClient};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tern_types::ImageSpec;

pub struct LockGuard {
    client: SiteClient,
    image: ImageSpec,
    cookie: String,
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl LockGuard {
    /// Takes the lock on `image` or fails with Busy naming the holder.
    pub async fn acquire(
        client: &SiteClient,
        image: ImageSpec,
        address: &str,
    ) -> Result<LockGuard, ClientError> {
        let cookie = format!("auto {}", random_id());
        let info = client.lock().acquire(&image, &cookie, address).await?;
        let lost = Arc::new(AtomicBool::new(false));
        // Renew at a third of the lease so two missed renewals still keep it.
        let every = Duration::from_millis((info.lease_ms / 3).max(100));
        let (c, l) = (client.clone(), lost.clone());
        let (i, k, a) = (image.clone(), cookie.clone(), address.to_string());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match c.lock().acquire(&i, &k, &a).await {
                    Ok(_) => {}
                    Err(e) if e.kind == tern_types::ErrorKind::Unavailable => {}
                    Err(_) => {
                        l.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        Ok(LockGuard {
            client: client.clone(),
            image,
            cookie,
            lost,
            renewer,
        })
    }

    pub fn cookie(&self) -> &str {
        &self.cookie
    }

    /// True once a renewal was refused (broken or taken over).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub async fn release(self) {
        self.renewer.abort();
        let _ = self.client.lock().release(&self.image, &self.cookie).await;
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}
