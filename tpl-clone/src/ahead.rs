//! A linked batch on RBD made ahead: threads sharing the run's one Ceph connection make the images of the next group of clones while the clones of this group are defined.
//!
//! An `rbd clone` and an `rbd rename` are each a dozen round trips to the cluster and no
//! data, so made one after the other they wait on the network; threads overlap them.
//! What the journal records and what libvirt sees stays in order, on the main thread:
//! a group's clones and their temporary images are journaled (one sync) before any thread
//! makes them; the made images' ids are journaled (one sync) before threads rename them
//! into place; then each clone is defined as one made alone is. So a kill -9 at any point
//! leaves only what the journal names, for the next run to remove; a clone that fails
//! removes its images as any other; and the images made for clones the batch did not
//! come to (a signal, a closed stdout) are removed before the run ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use tpl_common::error::{Error, Result};
use tpl_common::journal::clone::Entry;
use tpl_common::rbdclone::{Maker, Todo};
use tpl_common::signals::Interrupt;
use tpl_common::volume::Vol;

use crate::{Job, NewClone};

/// How many clones' images are made ahead at once: a quarter of the batch, so that the
/// threads of one group overlap the definitions of the one before, within these bounds.
const GROUP: (usize, usize) = (8, 32);
/// How many threads make them: librbd calls that mostly wait on the cluster.
const THREADS: usize = 8;

/// An image made ahead, as it stands.
#[derive(Debug)]
pub enum Ahead {
    /// Under its temporary name, with its id: not renamed (a signal came first).
    Made(String),
    /// Renamed to its final name.
    Final(Vol),
    /// librbd failed; the temporary image may exist.
    Failed(Error),
}

/// What the threads made of a group: each image's id, or librbd's error; None for one
/// never started (a signal came first).
type Made = Vec<(Todo, Option<Result<String>>)>;

/// `f` on each item, by up to [`THREADS`] threads; a stopping signal keeps them from
/// starting more (None for those).
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    intr: &Interrupt,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<Option<R>> {
    let next = AtomicUsize::new(0);
    let out: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..THREADS.min(items.len()) {
            s.spawn(|| {
                while intr.signal().is_none() {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else {
                        break;
                    };
                    let r = f(item);
                    *out[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
                }
            });
        }
    });
    out.into_iter()
        .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
        .collect()
}

/// Make each temporary image: an `rbd clone` of the template's snapshot, and its id.
fn make(maker: Maker, todo: Vec<Todo>, intr: &Interrupt) -> Made {
    let made = in_parallel(&todo, intr, |t| maker.make_linked(t));
    todo.into_iter().zip(made).collect()
}

impl<'a> Job<'a> {
    /// A linked batch on RBD, group by group: the images of the first group are made, then
    /// for each group its images are renamed into place, threads start on the next
    /// group's, and its clones are defined.
    pub(crate) fn make_groups(&mut self, clones: &[NewClone]) -> Result<()> {
        let size = (clones.len() / 4).clamp(GROUP.0, GROUP.1);
        let groups: Vec<&[NewClone]> = clones.chunks(size).collect();
        let intr = self.ctx.intr.clone();
        std::thread::scope(|sc| {
            let spawn = |maker: Maker<'a>, todo: Vec<Todo>| {
                let intr = intr.clone();
                sc.spawn(move || make(maker, todo, &intr))
            };
            let mut pending = None;
            let mut run = || -> Result<()> {
                for (k, group) in groups.iter().enumerate() {
                    if k == 0 {
                        let (maker, todo) = self.journal_group(group)?;
                        pending = Some((maker, spawn(maker, todo)));
                    }
                    if let Some((maker, h)) = pending.take() {
                        self.rename_group(maker, joined(h.join()))?;
                    }
                    if let Some(next) = groups.get(k + 1) {
                        let (maker, todo) = self.journal_group(next)?;
                        pending = Some((maker, spawn(maker, todo)));
                    }
                    group.iter().try_for_each(|c| self.make_one(c))?;
                }
                Ok(())
            };
            let res = run();
            // What the threads made for the next group is removed with the rest.
            if let Some((_, h)) = pending.take() {
                self.keep(joined(h.join()));
            }
            res
        })
    }

    /// Journal the clones of `group` and their temporary images (one sync) before any is
    /// made. Returns the connection and what to make.
    fn journal_group(&mut self, group: &[NewClone]) -> Result<(Maker<'a>, Vec<Todo>)> {
        self.ctx.intr.check()?;
        let s = self.s;
        let mut entries = Vec::new();
        let mut todo = Vec::new();
        let mut maker = None;
        for c in group {
            entries.push(Entry::Clone {
                name: c.name.clone(),
                uuid: c.uuid.clone(),
                uri: s.uri.clone(),
            });
            for img in self.plan.images(&self.tpl.name, &c.name) {
                let m = Maker::of(s, &img)?;
                maker = Some(m);
                let (entry, t) = m.todo(&c.uuid, &img);
                entries.push(entry);
                todo.push(t);
            }
        }
        self.jrnl.log_all(&entries)?;
        self.logged.extend(group.iter().map(|c| c.uuid.clone()));
        // Every clone of a linked batch on RBD has an image: the connection is known.
        let maker = maker.ok_or_else(|| {
            Error::failed(
                "cannot make the clones' RBD images ahead",
                "the group has no RBD image (a bug)",
            )
        })?;
        Ok((maker, todo))
    }

    /// Note what the threads made, then journal the ids of the made images (one sync) and
    /// rename them into place, in parallel. A rename that fails is that clone's error.
    fn rename_group(&mut self, maker: Maker, made: Made) -> Result<()> {
        let mut entries = Vec::new();
        let mut renames = Vec::new();
        for (t, r) in &made {
            if let Some(Ok(id)) = r {
                entries.push(maker.made(t, id));
                renames.push(t.clone());
            }
        }
        self.keep(made);
        self.jrnl.log_all(&entries)?;
        let done = in_parallel(&renames, &self.ctx.intr, |t| maker.commit(t));
        for (t, r) in renames.into_iter().zip(done) {
            let a = match r {
                Some(Ok(())) => Ahead::Final(t.dest()),
                Some(Err(e)) => Ahead::Failed(e),
                None => continue, // stays Made: a signal came first
            };
            self.ahead.insert(t.tmp(), a);
        }
        Ok(())
    }

    /// Note what the threads made, under its temporary name.
    fn keep(&mut self, made: Made) {
        for (t, r) in made {
            let a = match r {
                None => continue, // never started: nothing there
                Some(Ok(id)) => Ahead::Made(id),
                Some(Err(e)) => Ahead::Failed(e),
            };
            self.ahead.insert(t.tmp(), a);
        }
    }

    /// Remove the images made ahead for clones the batch did not come to (a signal, a
    /// closed stdout). One that cannot be removed keeps the journal, for the next run.
    pub(crate) fn drop_ahead(&mut self) {
        for (tmp, a) in std::mem::take(&mut self.ahead) {
            let image = match a {
                Ahead::Final(dest) => dest,
                Ahead::Made(_) | Ahead::Failed(_) => tmp,
            };
            if let Err(why) = image.remove(self.s) {
                self.leftovers = true;
                self.ctx.warn(format!(
                    "cannot remove the RBD image '{}', made ahead for a clone the run did not \
                     come to: {why}; the next run of a tpl tool removes it",
                    image.shown()
                ));
            }
        }
    }
}

/// A thread's result, its panic carried on.
fn joined<T>(r: std::thread::Result<T>) -> T {
    r.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
