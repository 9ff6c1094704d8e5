//! Bodies that a resync moves in parts, assembled into [`Spool`]s: those this side fetches
//! from the peer ([`Incoming`]) and those the peer stages here for a later Apply
//! ([`Staged`]). Pure: parts in, spools out; the RPC calls are the caller's.

use crate::service::apply::spool::{Spool, SpoolDir};
use crate::service::apply::BodyMeta;
use crate::service::resync::rpc::{MAX_STAGED, MAX_STAGED_BODIES};
use std::collections::HashMap;
use std::sync::Arc;

/// A mail's UID with its body's metadata and bytes.
pub(crate) type UidBody = (u32, (BodyMeta, Spool));

/// What each body a resync holds keeps in memory before it moves to a spool file: a resync
/// collects the bodies of up to [`LOCAL_CHUNK_MAILS`] saves before it applies them (and a peer
/// may stage up to [`MAX_STAGED_BODIES`]), so this bounds them together to a few MiB.
///
/// [`LOCAL_CHUNK_MAILS`]: crate::service::resync::LOCAL_CHUNK_MAILS
pub(crate) const RESYNC_SPOOL_MEMORY: usize = 64 << 10;

/// One body arriving in parts at increasing offsets.
#[derive(Debug)]
pub(crate) struct Assembly {
    total: u64,
    data: Spool,
}

impl Assembly {
    pub(crate) fn new(total: u64, dir: Option<Arc<SpoolDir>>) -> Assembly {
        Assembly {
            total,
            data: Spool::spilling_after(RESYNC_SPOOL_MEMORY, dir),
        }
    }

    pub(crate) fn held(&self) -> u64 {
        self.data.len()
    }

    pub(crate) fn complete(&self) -> bool {
        self.data.len() == self.total
    }

    /// Adds `part`, which starts at `offset`. What overlaps the bytes held is trimmed (a part
    /// sent again must not be appended twice); a part that would leave a gap, or go past the
    /// announced size, is refused.
    pub(crate) fn put(&mut self, offset: u64, part: &[u8]) -> Result<(), String> {
        let held = self.data.len();
        if offset > held {
            return Err(format!(
                "part at byte {offset}, but only {held} bytes came before"
            ));
        }
        let end = offset + part.len() as u64;
        if end > self.total {
            return Err(format!(
                "part ends at byte {end}, past the announced {} bytes",
                self.total
            ));
        }
        let skip = (held - offset).min(part.len() as u64) as usize;
        self.data
            .append(&part[skip..])
            .map_err(|e| format!("cannot spool the body: {e}"))
    }

    pub(crate) fn into_spool(self) -> Spool {
        self.data
    }
}

/// The bodies of a `bodies` answer by UID. Blobs come only for the mails found, one per
/// `Some` of `found`, in order: a mail that is gone takes no blob. (Taking one anyway shifted
/// every later body onto the wrong mail: the convergence soak caught it.)
pub(crate) fn pair_bodies<B>(
    uids: &[u32],
    found: Vec<Option<BodyMeta>>,
    blobs: Vec<B>,
) -> Vec<(u32, (BodyMeta, B))> {
    let mut blobs = blobs.into_iter();
    let mut out = Vec::new();
    for (uid, f) in uids.iter().zip(found) {
        let Some(meta) = f else { continue };
        let Some(data) = blobs.next() else { break };
        out.push((*uid, (meta, data)));
    }
    out
}

/// Bodies fetched from the peer, answer by answer: the whole ones, and the one still coming
/// in parts. Each goes into a spool as it arrives, so that only its first
/// [`RESYNC_SPOOL_MEMORY`] bytes (and the answer being read) are in memory.
pub(crate) struct Incoming {
    dir: Option<Arc<SpoolDir>>,
    pub(crate) done: Vec<UidBody>,
    part: Option<(u32, BodyMeta, Assembly)>,
}

impl Incoming {
    pub(crate) fn new(dir: Option<Arc<SpoolDir>>) -> Incoming {
        Incoming {
            dir,
            done: Vec::new(),
            part: None,
        }
    }

    /// Where the next request's first UID is to be sent from.
    pub(crate) fn offset(&self) -> u64 {
        self.part.as_ref().map_or(0, |(_, _, a)| a.held())
    }

    /// Takes the answer to a request for `asked` (the first from [`Incoming::offset`]):
    /// returns how many of `asked` are done with. A body that is not whole yet is not: it is
    /// asked for again, from where it ends.
    pub(crate) fn take(
        &mut self,
        asked: &[u32],
        found: Vec<Option<BodyMeta>>,
        partial: Option<u64>,
        blobs: Vec<Vec<u8>>,
    ) -> Result<usize, String> {
        if found.is_empty() || found.len() > asked.len() {
            return Err("the peer answered a bodies request with no progress".into());
        }
        let mut answered = found.len();
        let got = pair_bodies(&asked[..found.len()], found, blobs);
        let last = got.len().saturating_sub(1);
        // Only the first can continue the body in parts; if that one is not first, it is gone
        // on the peer now, and so is what came of it.
        let mut cont = self.part.take();
        for (i, (uid, (meta, data))) in got.into_iter().enumerate() {
            let mut a = match cont.take() {
                Some((u, _, a)) if i == 0 && u == uid => {
                    if data.is_empty() {
                        return Err(format!("the peer sent no more of uid {uid}"));
                    }
                    a
                }
                _ => {
                    let total = match partial {
                        Some(t) if i == last => t,
                        _ => data.len() as u64,
                    };
                    if total > MAX_STAGED {
                        return Err(format!(
                            "uid {uid} ({total} bytes) is larger than this server takes"
                        ));
                    }
                    Assembly::new(total, self.dir.clone())
                }
            };
            let at = a.held();
            a.put(at, &data)
                .map_err(|e| format!("the body of uid {uid} from the peer: {e}"))?;
            if a.complete() {
                self.done.push((uid, (meta, a.into_spool())));
            } else if i == last && partial.is_some() {
                answered -= 1;
                self.part = Some((uid, meta, a));
            } else {
                return Err(format!("the peer sent only part of uid {uid}"));
            }
        }
        Ok(answered)
    }
}

/// Bodies the peer stages on this connection for a later Apply, by GUID: at most
/// [`MAX_STAGED`] bytes and [`MAX_STAGED_BODIES`] bodies at once. Every Apply ends the
/// staging: what it does not take was left by a push that stopped half way (the mail went
/// away meanwhile), and is let go; the rest goes with the connection.
#[derive(Default)]
pub(crate) struct Staged {
    bodies: HashMap<String, Assembly>,
}

impl Staged {
    /// One part: at offset 0 it begins (again) the body `guid` of `total` bytes; later parts
    /// continue it.
    pub(crate) fn put(
        &mut self,
        guid: String,
        total: u64,
        offset: u64,
        part: &[u8],
        dir: Option<Arc<SpoolDir>>,
    ) -> Result<(), String> {
        if offset == 0 {
            self.bodies.remove(&guid);
        }
        let held: u64 = self.bodies.values().map(Assembly::held).sum();
        if total > MAX_STAGED || held + part.len() as u64 > MAX_STAGED {
            return Err(format!(
                "staged body {guid} ({total} bytes) is larger than this server holds \
                 ({held} bytes staged, at most {MAX_STAGED})"
            ));
        }
        if offset == 0 && self.bodies.len() >= MAX_STAGED_BODIES {
            return Err(format!(
                "more than {MAX_STAGED_BODIES} bodies staged at once"
            ));
        }
        if offset > 0 && self.bodies.get(&guid).is_none_or(|a| a.total != total) {
            self.bodies.remove(&guid);
            return Err(format!(
                "staged part of body {guid} at byte {offset}, but its staging did not begin \
                 (at byte 0, with {total} bytes)"
            ));
        }
        let a = self
            .bodies
            .entry(guid.clone())
            .or_insert_with(|| Assembly::new(total, dir));
        if let Err(e) = a.put(offset, part) {
            self.bodies.remove(&guid);
            return Err(format!("staged body {guid}: {e}"));
        }
        Ok(())
    }

    /// The body staged whole under `guid`.
    pub(crate) fn take(&mut self, guid: &str) -> Result<Spool, String> {
        match self.bodies.remove(guid) {
            Some(a) if a.complete() => Ok(a.into_spool()),
            _ => Err(format!("body {guid} was not staged whole")),
        }
    }

    /// Lets go of every body staged.
    pub(crate) fn clear(&mut self) {
        self.bodies.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.bodies.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::apply::spool::SPOOL_MEMORY;

    fn meta(guid: &str) -> BodyMeta {
        BodyMeta {
            received_date: 0,
            save_date: 0,
            guid: guid.into(),
            staged: false,
        }
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn a_missing_body_takes_no_blob() {
        let got = pair_bodies(
            &[1, 2, 3],
            vec![Some(meta("g1")), None, Some(meta("g3"))],
            vec![b"one".to_vec(), b"three".to_vec()],
        );
        let got: Vec<(u32, &str, &[u8])> = got
            .iter()
            .map(|(u, (m, d))| (*u, m.guid.as_str(), d.as_slice()))
            .collect();
        assert_eq!(got, vec![(1, "g1", &b"one"[..]), (3, "g3", &b"three"[..])]);
    }

    #[test]
    fn an_assembly_trims_overlap_and_refuses_gaps_and_overruns() {
        let want = bytes(100, 7);
        let mut a = Assembly::new(100, None);
        a.put(0, &want[..40]).unwrap();
        // Sent again, and overlapping: only the new bytes are added.
        a.put(0, &want[..40]).unwrap();
        a.put(30, &want[30..60]).unwrap();
        assert_eq!(a.held(), 60);
        assert!(a.put(61, &want[61..70]).unwrap_err().contains("only 60"));
        assert!(a
            .put(60, &bytes(41, 1))
            .unwrap_err()
            .contains("past the announced"));
        assert_eq!(a.held(), 60);
        a.put(60, &want[60..]).unwrap();
        assert!(a.complete());
        assert_eq!(a.into_spool(), want[..]);
    }

    #[test]
    fn the_bodies_a_resync_holds_at_once_keep_a_few_mib_in_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SpoolDir::open(&tmp.path().join("spool")).unwrap();
        // The most a chunk of a resync holds before applying: its saves' bodies, each just
        // under what a stream's spool keeps in memory.
        let body = bytes(SPOOL_MEMORY - 1, 9);
        let held: Vec<Assembly> = (0..crate::service::resync::LOCAL_CHUNK_MAILS)
            .map(|_| {
                let mut a = Assembly::new(body.len() as u64, Some(dir.clone()));
                a.put(0, &body).unwrap();
                a
            })
            .collect();
        let in_memory: u64 = held.iter().map(|a| a.data.in_memory()).sum();
        assert!(in_memory <= 4 << 20, "{in_memory} bytes in memory");
        assert!(held.iter().all(|a| a.data.on_disk() == body.len() as u64));
        assert_eq!(held[0].data.to_vec().unwrap(), body);
    }

    #[test]
    fn a_large_body_fetched_in_parts_ends_in_a_spool_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SpoolDir::open(&tmp.path().join("spool")).unwrap();
        let big = bytes(3 * SPOOL_MEMORY + 5, 3);
        let cut = SPOOL_MEMORY + 1;
        let mut inc = Incoming::new(Some(dir));
        // Two small ones, then the start of the large one.
        let n = inc
            .take(
                &[1, 2, 3, 4],
                vec![Some(meta("g1")), None, Some(meta("g3"))],
                Some(big.len() as u64),
                vec![b"one".to_vec(), big[..cut].to_vec()],
            )
            .unwrap();
        assert_eq!(n, 2, "uid 3 is asked for again");
        assert_eq!(inc.offset(), cut as u64);
        // The rest of it, in two answers, the last with the next mail.
        let n = inc
            .take(
                &[3, 4],
                vec![Some(meta("g3"))],
                Some(big.len() as u64),
                vec![big[cut..2 * cut].to_vec()],
            )
            .unwrap();
        assert_eq!(n, 0);
        let n = inc
            .take(
                &[3, 4],
                vec![Some(meta("g3")), Some(meta("g4"))],
                None,
                vec![big[2 * cut..].to_vec(), b"four".to_vec()],
            )
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(inc.offset(), 0);
        let got: Vec<(u32, &str)> = inc
            .done
            .iter()
            .map(|(u, (m, _))| (*u, m.guid.as_str()))
            .collect();
        assert_eq!(got, vec![(1, "g1"), (3, "g3"), (4, "g4")]);
        let large = &inc.done[1].1 .1;
        assert!(large.fd().is_some(), "held in a file");
        assert!(large.in_memory() == 0);
        assert_eq!(*large, big[..]);
        assert_eq!(inc.done[2].1 .1, b"four");
    }

    #[test]
    fn a_body_in_parts_that_vanishes_or_stalls_on_the_peer_is_dropped_or_refused() {
        let mut inc = Incoming::new(None);
        inc.take(
            &[5, 6],
            vec![Some(meta("g5"))],
            Some(10),
            vec![b"01234".to_vec()],
        )
        .unwrap();
        // Gone now: the answer starts with the next mail.
        let n = inc
            .take(
                &[5, 6],
                vec![None, Some(meta("g6"))],
                None,
                vec![b"six".to_vec()],
            )
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(inc.done.len(), 1);
        assert_eq!(inc.done[0].0, 6);

        let mut inc = Incoming::new(None);
        inc.take(
            &[5],
            vec![Some(meta("g5"))],
            Some(10),
            vec![b"01234".to_vec()],
        )
        .unwrap();
        let e = inc
            .take(&[5], vec![Some(meta("g5"))], Some(10), vec![Vec::new()])
            .unwrap_err();
        assert!(e.contains("no more of uid 5"), "{e}");
        let e = Incoming::new(None)
            .take(
                &[7],
                vec![Some(meta("g7"))],
                Some(MAX_STAGED + 1),
                vec![b"x".to_vec()],
            )
            .unwrap_err();
        assert!(e.contains("larger than this server takes"), "{e}");
        let e = Incoming::new(None)
            .take(&[7], vec![], None, vec![])
            .unwrap_err();
        assert!(e.contains("no progress"), "{e}");
    }

    #[test]
    fn staging_assembles_in_order_and_keeps_its_bounds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SpoolDir::open(&tmp.path().join("spool")).unwrap();
        let big = bytes(2 * SPOOL_MEMORY + 3, 9);
        let mut st = Staged::default();
        let half = big.len() / 2;
        st.put(
            "g".into(),
            big.len() as u64,
            0,
            &big[..half],
            Some(dir.clone()),
        )
        .unwrap();
        assert!(st.take("g").is_err(), "not whole yet");
        st.put(
            "g".into(),
            big.len() as u64,
            0,
            &big[..half],
            Some(dir.clone()),
        )
        .unwrap();
        st.put(
            "g".into(),
            big.len() as u64,
            half as u64,
            &big[half..],
            Some(dir.clone()),
        )
        .unwrap();
        let s = st.take("g").unwrap();
        assert!(s.fd().is_some());
        assert_eq!(s, big[..]);
        assert_eq!(st.len(), 0);

        // A part of a staging never begun, or at a gap, is refused and nothing is kept.
        let e = st.put("h".into(), 10, 5, b"56789", None).unwrap_err();
        assert!(e.contains("did not begin"), "{e}");
        st.put("h".into(), 10, 0, b"01", None).unwrap();
        let e = st.put("h".into(), 10, 5, b"56789", None).unwrap_err();
        assert!(e.contains("only 2 bytes"), "{e}");
        assert_eq!(st.len(), 0);
        // Another size for the same GUID past byte 0 is not a continuation.
        st.put("h".into(), 10, 0, b"01", None).unwrap();
        assert!(st.put("h".into(), 12, 2, b"23", None).is_err());

        // Bounds: the announced size, the bytes held, the bodies held.
        let e = st
            .put("x".into(), MAX_STAGED + 1, 0, b"", None)
            .unwrap_err();
        assert!(e.contains("larger than this server holds"), "{e}");
        st.clear();
        for i in 0..MAX_STAGED_BODIES {
            st.put(format!("b{i}"), 10, 0, b"0", None).unwrap();
        }
        let e = st.put("one more".into(), 10, 0, b"0", None).unwrap_err();
        assert!(e.contains("bodies staged at once"), "{e}");
        // Continuing one already staged is fine.
        st.put("b0".into(), 10, 1, b"1", None).unwrap();
        st.clear();
        assert_eq!(st.len(), 0);
    }
}
