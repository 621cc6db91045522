//! Exclusive locks: at most one writer per image with the `exclusive-lock`
//! feature. A lock has an owner (entity + cookie) and a lease the owner
//! renews; a dead owner loses it when the lease runs out. `lock rm` breaks a
//! lock and fences its cookie: every later write or renewal with it is
//! refused, so a writer that was presumed dead cannot corrupt the image
//! when it wakes up. Fenced cookies are persisted; leases are not (after a
//! ternd restart a live owner re-takes its lock on its next write or renewal).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tern_store::{KvTable, Store};
use tern_types::ErrorKind;
use tern_types::error::Error;

#[derive(Debug, Clone)]
pub struct Lock {
    pub cookie: String,
    pub entity: String,
    pub address: String,
    pub acquired: Instant,
    pub expires: Instant,
}

/// Who asks for a lock.
pub struct Claim<'a> {
    pub cookie: &'a str,
    pub entity: &'a str,
    pub address: &'a str,
}

#[derive(Default)]
pub struct Locks {
    /// Keyed by image id: renames keep the lock.
    held: Mutex<HashMap<String, Lock>>,
    /// Open NBD exports per image id, as rbd's watchers: while an image
    /// has any, `rm` refuses (a client writing to a removed image gets EIO).
    watchers: Mutex<HashMap<String, Vec<(u64, String)>>>,
    next_watch: std::sync::atomic::AtomicU64,
}

/// One open of an image; dropping it ends the watch.
pub struct Watch {
    locks: std::sync::Arc<Locks>,
    image_id: String,
    id: u64,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut w = self.locks.watchers.lock();
        if let Some(v) = w.get_mut(&self.image_id) {
            v.retain(|(id, _)| *id != self.id);
            if v.is_empty() {
                w.remove(&self.image_id);
            }
        }
    }
}

fn fence_key(cookie: &str) -> String {
    format!("fenced/{cookie}")
}

impl Locks {
    fn fenced(store: &Store, cookie: &str) -> Result<bool, Error> {
        Ok(store.kv_get(KvTable::Site, &fence_key(cookie))?.is_some())
    }

    fn fenced_error(spec: &str, cookie: &str) -> Error {
        Error::new(
            ErrorKind::Fenced,
            format!(
                "the lock {cookie} on {spec} was broken (lock rm): this writer is fenced; reopen the image to write again"
            ),
        )
    }

    /// Takes (or renews) the lock for `claim.cookie`.
    pub fn acquire(
        &self,
        store: &Store,
        image_id: &str,
        spec: &str,
        claim: Claim<'_>,
        lease: Duration,
    ) -> Result<Lock, Error> {
        let Claim {
            cookie,
            entity,
            address,
        } = claim;
        if Self::fenced(store, cookie)? {
            return Err(Self::fenced_error(spec, cookie));
        }
        let now = Instant::now();
        let mut held = self.held.lock();
        if let Some(l) = held.get(image_id)
            && l.cookie != cookie
            && l.expires > now
        {
            return Err(busy(spec, l, now));
        }
        let lock = match held.get(image_id) {
            Some(l) if l.cookie == cookie => Lock {
                expires: now + lease,
                ..l.clone()
            },
            _ => Lock {
                cookie: cookie.to_string(),
                entity: entity.to_string(),
                address: address.to_string(),
                acquired: now,
                expires: now + lease,
            },
        };
        held.insert(image_id.to_string(), lock.clone());
        Ok(lock)
    }

    /// Does `cookie` hold the lock right now (memory only: the write fast path)?
    pub fn holds(&self, image_id: &str, cookie: &str) -> bool {
        let now = Instant::now();
        self.held
            .lock()
            .get(image_id)
            .is_some_and(|l| l.cookie == cookie && l.expires > now)
    }

    pub fn release(&self, image_id: &str, cookie: &str) {
        let mut held = self.held.lock();
        if held.get(image_id).is_some_and(|l| l.cookie == cookie) {
            held.remove(image_id);
        }
    }

    /// May a write with `cookie` (or none) go ahead on this image?
    pub fn check_write(
        &self,
        store: &Store,
        image_id: &str,
        spec: &str,
        cookie: Option<&str>,
        entity: &str,
        lease: Duration,
    ) -> Result<(), Error> {
        if let Some(c) = cookie {
            // Writing with a cookie (re)takes the lock: this is how a live
            // owner recovers it after a ternd restart.
            self.acquire(
                store,
                image_id,
                spec,
                Claim {
                    cookie: c,
                    entity,
                    address: "",
                },
                lease,
            )?;
            return Ok(());
        }
        let now = Instant::now();
        match self.held.lock().get(image_id) {
            Some(l) if l.expires > now => Err(busy(spec, l, now)),
            _ => Ok(()),
        }
    }

    /// Records that `who` has the image open, until the Watch is dropped.
    pub fn watch(self: &std::sync::Arc<Self>, image_id: &str, who: String) -> Watch {
        let id = self
            .next_watch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.watchers
            .lock()
            .entry(image_id.to_string())
            .or_default()
            .push((id, who));
        Watch {
            locks: self.clone(),
            image_id: image_id.to_string(),
            id,
        }
    }

    /// Runs `remove` only if nobody has the image open or holds its lock,
    /// and keeps new opens waiting until it is done. Refuses as rbd does
    /// ("image has watchers"), naming who holds it.
    pub fn remove_unless_open<T>(
        &self,
        image_id: &str,
        spec: &str,
        remove: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        // A client that has just disconnected may not be closed here yet:
        // give it a moment before calling the image busy.
        let deadline = Instant::now() + Duration::from_secs(1);
        let watchers = loop {
            let w = self.watchers.lock();
            let open =
                w.get(image_id).is_some_and(|v| !v.is_empty()) || self.list(image_id).is_some();
            if !open || Instant::now() >= deadline {
                break w;
            }
            drop(w);
            std::thread::sleep(Duration::from_millis(50));
        };
        let now = Instant::now();
        let lock = self
            .held
            .lock()
            .get(image_id)
            .filter(|l| l.expires > now)
            .cloned();
        let open = watchers.get(image_id).map(Vec::as_slice).unwrap_or(&[]);
        if !open.is_empty() || lock.is_some() {
            let mut who: Vec<String> = open.iter().map(|(_, w)| w.clone()).collect();
            if let Some(l) = &lock
                && !who.iter().any(|w| w.contains(&l.cookie))
            {
                who.push(format!("{} (exclusive lock {})", l.entity, l.cookie));
            }
            return Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "image has watchers - not removing: {spec} is open by {}; disconnect it (`tern device unmap`, or stop the NBD client) and retry{}",
                    who.join(", "),
                    match &lock {
                        Some(l) => format!(
                            "; if its owner is dead, `tern lock rm {spec} {} {}` fences it",
                            l.cookie, l.entity
                        ),
                        None => String::new(),
                    }
                ),
            ));
        }
        remove()
    }

    pub fn list(&self, image_id: &str) -> Option<Lock> {
        let now = Instant::now();
        self.held
            .lock()
            .get(image_id)
            .filter(|l| l.expires > now)
            .cloned()
    }

    /// `lock rm`: breaks the lock if `cookie` and `entity` match, fencing the cookie.
    pub fn break_lock(
        &self,
        store: &Store,
        image_id: &str,
        spec: &str,
        cookie: &str,
        entity: &str,
    ) -> Result<(), Error> {
        let mut held = self.held.lock();
        match held.get(image_id) {
            Some(l) if l.cookie == cookie && l.entity == entity => {}
            Some(l) => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "{spec} is locked by {} with lock id {}, not {entity} {cookie}: see `tern lock ls {spec}`",
                        l.entity, l.cookie
                    ),
                ));
            }
            None => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("{spec} has no lock {cookie}"),
                ));
            }
        }
        store.kv_put(
            KvTable::Site,
            &fence_key(cookie),
            &format!("{spec} {entity}"),
        )?;
        held.remove(image_id);
        tracing::warn!(image = spec, cookie, entity, "lock broken; owner fenced");
        Ok(())
    }
}

fn busy(spec: &str, l: &Lock, now: Instant) -> Error {
    Error::new(
        ErrorKind::Busy,
        format!(
            "{spec} is locked by {} (lock id {}, held {}s, lease ends in {}s): wait for it, or break it with `tern lock rm {spec} {} {}`",
            l.entity,
            l.cookie,
            now.duration_since(l.acquired).as_secs(),
            l.expires.saturating_duration_since(now).as_secs(),
            l.cookie,
            l.entity
        ),
    )
}
