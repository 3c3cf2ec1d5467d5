//! Records the PSKs the bootstrap server generates (TS 1.1 Core §6.1: the
//! device's new credentials must hold before Bootstrap-Finish): the shards
//! send [`StoreRequest`]s here; this thread writes them to the directory in
//! batches (one read-modify-write, one fsync per batch), tells every shard
//! the endpoints changed (sessions on the old key end), and then answers
//! each request's shard, which sends Bootstrap-Finish.

use crate::control::directory::Directory;
use crate::proto::lwm2m::bootstrap::StoreRequest;
use crate::proto::lwm2m::server::ControlMsg;
use crate::shard::runtime::ControlHandle;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A store request and the shard waiting for the answer.
pub type ShardStore = (usize, StoreRequest);

/// Largest batch written at once.
const BATCH: usize = 1024;

pub struct BootstrapStore {
    join: Option<JoinHandle<()>>,
    stop: Option<Sender<()>>,
}

impl BootstrapStore {
    /// Runs until [`BootstrapStore::stop`] (or every sender of `rx` is
    /// gone). Stopping does not wait for the shards' senders to be dropped:
    /// a shard executor may keep a detached task (and its sender) alive
    /// after it returned.
    pub fn start(
        directory: Arc<Directory>,
        control: ControlHandle,
        rx: Receiver<ShardStore>,
    ) -> std::io::Result<BootstrapStore> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let join = std::thread::Builder::new()
            .name("bootstrap-store".into())
            .spawn(move || loop {
                let first = crossbeam_channel::select! {
                    recv(rx) -> m => match m {
                        Ok(first) => first,
                        Err(_) => break,
                    },
                    // Called after the shards stopped: nobody is waiting
                    // for an answer any more, and a key not recorded was
                    // never sent in a Finish.
                    recv(stop_rx) -> _ => break,
                };
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                store_batch(&directory, &control, batch);
            })?;
        Ok(BootstrapStore {
            join: Some(join),
            stop: Some(stop_tx),
        })
    }

    /// Ends the thread after the batch it is writing (call it after the
    /// shards stopped) and waits for it.
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Writes one batch; a batch refused as a whole (one bad item: the
/// identity clashes with another endpoint's, the endpoint was removed) is
/// retried item by item so only the bad ones fail.
pub fn store_batch(directory: &Directory, control: &ControlHandle, batch: Vec<ShardStore>) {
    let names: Vec<String> = batch.iter().map(|(_, r)| r.endpoint.clone()).collect();
    let results: Vec<Result<(), String>> = match write(directory, &batch) {
        Ok(()) => vec![Ok(()); batch.len()],
        Err(_) if batch.len() > 1 => batch
            .iter()
            .map(|item| write(directory, std::slice::from_ref(item)))
            .collect(),
        Err(e) => vec![Err(e)],
    };
    let changed: Vec<String> = names
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(n, _)| n.clone())
        .collect();
    if !changed.is_empty() {
        // Before the answers: every shard ends sessions on the old keys
        // before the device can come back with the new one (one relay
        // channel, in order).
        control.send(ControlMsg::Endpoints(changed.into()));
    }
    for ((shard, req), result) in batch.into_iter().zip(results) {
        if let Err(e) = &result {
            tracing::warn!(endpoint = %req.endpoint, error = %e, "generated PSK not recorded; bootstrap fails");
        }
        control.bootstrap_stored(shard, req.session, result);
    }
}

fn write(directory: &Directory, batch: &[ShardStore]) -> Result<(), String> {
    let names: Vec<String> = batch.iter().map(|(_, r)| r.endpoint.clone()).collect();
    let mut it = batch.iter();
    directory
        .modify(&names, |_, cur| match it.next() {
            Some((_, r)) => r.psk.apply(cur),
            None => cur.clone(),
        })
        .map_err(|e| e.to_string())
}
