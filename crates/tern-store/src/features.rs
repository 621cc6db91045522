//! Changing the features of a live image, with rbd's rules.
//!
//! Only exclusive-lock, object-map, fast-diff and journaling can be turned
//! on or off (deep-flatten only off), as with `rbd feature enable|disable`.
//! Journaling is the one with data behind it:
//!
//! * enable: with I/O held off, the image is flushed (so its current state
//!   never needs replaying), an empty journal is created, then the feature
//!   is committed. A crash before the commit leaves a journal directory on
//!   an image without the feature, which the next open deletes.
//! * disable: with I/O held off, a full checkpoint makes the object files
//!   hold everything durably, the feature is committed off, then the
//!   journal is deleted (again, a crash in between leaves a directory the
//!   next open deletes).

use crate::error::StoreError;
use crate::journal::Journal;
use crate::store::Store;
use crate::types::{ImageInfo, now_secs};
use std::sync::Arc;
use tern_types::Features;

const TOGGLEABLE: u64 =
    Features::EXCLUSIVE_LOCK | Features::OBJECT_MAP | Features::FAST_DIFF | Features::JOURNALING;

impl Store {
    /// Enables the `enable` bits and disables the `disable` bits of the
    /// image's features; returns the new info.
    pub fn image_set_features(
        &self,
        pool: &str,
        image: &str,
        enable: u64,
        disable: u64,
    ) -> Result<ImageInfo, StoreError> {
        let spec = format!("{pool}/{image}");
        let refuse = |reason: String| StoreError::FeatureChange {
            spec: spec.clone(),
            reason,
        };
        let names = |bits: u64| Features(bits).names().join(", ");
        if enable & disable != 0 {
            return Err(refuse(format!(
                "{} cannot be both enabled and disabled",
                names(enable & disable)
            )));
        }
        if enable & !TOGGLEABLE != 0 {
            return Err(refuse(format!(
                "{} cannot be enabled on an existing image",
                names(enable & !TOGGLEABLE)
            )));
        }
        if disable & !(TOGGLEABLE | Features::DEEP_FLATTEN) != 0 {
            return Err(refuse(format!(
                "{} cannot be disabled",
                names(disable & !(TOGGLEABLE | Features::DEEP_FLATTEN))
            )));
        }
        let _admin = self.admin.lock();
        let img = self.open_image(pool, image)?;
        let mut st = img.state_write();
        img.check(&st, "feature change", 0, 0)?;
        let cur = st.info.features.0;
        let new = (cur | enable) & !disable;
        let lost_lock = disable & Features::EXCLUSIVE_LOCK != 0;
        for (dep, what) in [
            (Features::JOURNALING, "journaling"),
            (Features::OBJECT_MAP, "object-map"),
        ] {
            if lost_lock && new & dep != 0 {
                return Err(refuse(format!(
                    "cannot disable exclusive-lock while {what} is enabled: disable {what} first"
                )));
            }
        }
        if enable & Features::JOURNALING != 0 && new & Features::EXCLUSIVE_LOCK == 0 {
            return Err(refuse(
                "journaling requires exclusive-lock: enable exclusive-lock too".into(),
            ));
        }
        Features(new)
            .validate()
            .map_err(|source| StoreError::InvalidFeatures {
                spec: spec.clone(),
                source,
            })?;
        if new == cur {
            return Ok(st.info.clone());
        }
        let was_on = cur & Features::JOURNALING != 0;
        let on = new & Features::JOURNALING != 0;
        let now = now_secs();
        let commit = || {
            self.meta.image_update(pool, image, |r| {
                r.features = Features(new);
                r.modified = now;
            })
        };
        if on && !was_on {
            // The journal starts after the current state: that state must
            // be durable without it.
            img.flush_locked(&st)?;
            Journal::create(&img.dir, &spec, img.id(), 1)?;
            let opened = Journal::open(
                &img.dir,
                &spec,
                img.id(),
                self.journal_options_for(img.id()),
            );
            let j = match opened.and_then(|j| commit().map(|_| j)) {
                Ok(j) => j,
                Err(e) => {
                    let _ = Journal::remove(&img.dir, &spec);
                    return Err(e);
                }
            };
            img.set_journal(&mut st, Some(Arc::new(j)));
        } else if was_on && !on {
            img.checkpoint_locked(&st, true)?;
            commit()?;
            img.set_journal(&mut st, None);
            Journal::remove(&img.dir, &spec)?;
        } else {
            commit()?;
        }
        st.info.features = Features(new);
        st.info.modified = now;
        Ok(st.info.clone())
    }
}
