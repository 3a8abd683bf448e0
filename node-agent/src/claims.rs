//! Addresses claimed by owners known by (namespace, name): a pod's address in the workload
//! store, a Service's VIP or endpoint in the Services index. Nearly always one owner per
//! address; a reused pod address, two sources disagreeing or two Services given the same VIP
//! make several, and the choice among them is the one a full rebuild in name order made (the
//! last by name, or the first), kept while owners come and go one at a time.

use std::collections::HashMap;
use std::sync::Arc;

/// The holders of one address: nearly always one.
#[derive(Debug)]
enum Claim<T> {
    One(Arc<T>),
    Many(Vec<Arc<T>>),
}

/// What claims an address, known by its owner's (namespace, name).
pub trait Owned {
    fn owner(&self) -> (&str, &str);
}

/// Addresses and who claims them, changed one owner at a time.
#[derive(Debug)]
pub struct Claims<A, T> {
    map: HashMap<A, Claim<T>>,
    /// With several claimants: the last by (namespace, name) if true, else the first.
    last_wins: bool,
}

impl<A: std::hash::Hash + Eq + Copy, T: Owned> Claims<A, T> {
    pub fn new(last_wins: bool) -> Self {
        Self {
            map: HashMap::new(),
            last_wins,
        }
    }

    pub fn get(&self, a: &A) -> Option<&Arc<T>> {
        match self.map.get(a)? {
            Claim::One(t) => Some(t),
            Claim::Many(v) => {
                let by_owner = |x: &&Arc<T>, y: &&Arc<T>| x.owner().cmp(&y.owner());
                if self.last_wins {
                    v.iter().max_by(by_owner)
                } else {
                    v.iter().min_by(by_owner)
                }
            }
        }
    }

    pub fn claim(&mut self, a: A, t: Arc<T>) {
        match self.map.get_mut(&a) {
            None => {
                self.map.insert(a, Claim::One(t));
            }
            Some(Claim::One(x)) if x.owner() == t.owner() => *x = t,
            Some(c @ Claim::One(_)) => {
                let Claim::One(x) = std::mem::replace(c, Claim::Many(Vec::new())) else {
                    unreachable!()
                };
                *c = Claim::Many(vec![x, t]);
            }
            Some(Claim::Many(v)) => {
                v.retain(|x| x.owner() != t.owner());
                v.push(t);
            }
        }
    }

    pub fn release(&mut self, a: &A, owner: (&str, &str)) {
        let gone = match self.map.get_mut(a) {
            Some(Claim::One(x)) => x.owner() == owner,
            Some(c @ Claim::Many(_)) => {
                let Claim::Many(v) = c else { unreachable!() };
                v.retain(|x| x.owner() != owner);
                if v.len() == 1 {
                    *c = Claim::One(v.pop().expect("one left"));
                }
                false
            }
            None => false,
        };
        if gone {
            self.map.remove(a);
        }
    }
}
