//! Values that fail to serialize or deserialize, at each of the four places
//! that can happen: the argument in the caller, the argument in the worker,
//! the result in the worker, the result in the caller. Each fails its own
//! task only; the pool (and its workers) go on.

use crate::common;

use crate::common::pool;

use procpool::{Error, MapOptions, Pool};
use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashSet;
use std::time::Duration;

fn inc(x: u64) -> u64 {
    x + 1
}

/// Serializing it always fails.
#[derive(Debug)]
struct Unencodable;

impl Serialize for Unencodable {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(S::Error::custom("nope"))
    }
}

impl<'de> Deserialize<'de> for Unencodable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d).map(|()| Unencodable)
    }
}

/// Serializes as its number; deserializing it always fails.
#[derive(Debug)]
struct Undecodable(u32);

impl Serialize for Undecodable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Undecodable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        Err(D::Error::custom(format!("cannot decode {n}")))
    }
}

/// A number that fails to serialize when it is in `BAD_ENCODE`, and to
/// deserialize when it is in `BAD_DECODE`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Picky(u32);

const BAD_ENCODE: [u32; 2] = [77, 1003];
const BAD_DECODE: [u32; 3] = [13, 27, 2013];

impl Serialize for Picky {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if BAD_ENCODE.contains(&self.0) {
            return Err(S::Error::custom(format!("will not encode {}", self.0)));
        }
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Picky {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        if BAD_DECODE.contains(&n) {
            return Err(D::Error::custom(format!("will not decode {n}")));
        }
        Ok(Picky(n))
    }
}

fn take_unencodable(_: Unencodable) -> u32 {
    1
}

fn take_undecodable(_: Undecodable) -> u32 {
    unreachable!("the argument cannot be decoded")
}

fn give_unencodable(_: u32) -> Unencodable {
    Unencodable
}

fn give_undecodable(n: u32) -> Undecodable {
    Undecodable(n)
}

fn picky_plus(p: Picky) -> Picky {
    Picky(p.0 + 1000)
}

fn picky_id(p: Picky) -> Picky {
    p
}

/// Item 3 of the input: sleeps, so that later failures finish first, then
/// returns a result that will not encode (1003).
fn picky_slow_plus(p: Picky) -> Picky {
    if p.0 == 3 {
        std::thread::sleep(Duration::from_millis(300));
    }
    Picky(p.0 + 1000)
}

fn u32_to_picky(n: u32) -> Picky {
    Picky(n)
}

/// The pool still serves tasks correctly, with the same workers.
fn assert_pool_fine(pool: &Pool, workers: &HashSet<u32>) {
    assert_eq!(pool.apply(inc, 41).unwrap(), 42);
    assert_eq!(
        pool.map(inc, 0..100u64).unwrap(),
        (1..101u64).collect::<Vec<_>>()
    );
    let now: HashSet<u32> = pool.worker_pids().into_iter().collect();
    assert_eq!(&now, workers, "a codec error cost a worker");
}

fn expect_codec(r: Result<impl std::fmt::Debug, Error>, encode: bool, what: &str, text: &str) {
    let e = match r {
        Err(e) => e,
        Ok(v) => panic!("expected a codec error, got Ok({v:?})"),
    };
    let (w, source) = match (&e, encode) {
        (Error::Encode { what, source, .. }, true) => (*what, source),
        (Error::Decode { what, source, .. }, false) => (*what, source),
        _ => panic!(
            "expected {} {{ what: {what:?} }}, got {e:?}",
            if encode { "Encode" } else { "Decode" }
        ),
    };
    assert_eq!(w, what, "{e:?}");
    assert!(source.message().contains(text), "{e:?} lacks {text:?}");
    let shown = e.to_string();
    assert!(shown.contains(what), "{shown}");
    assert!(
        std::error::Error::source(&e).is_some(),
        "{e:?} has no source"
    );
}

#[test]
fn argument_that_fails_to_serialize_is_refused_at_submit() {
    common::bounded(|| {
        let pool = pool(2);
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        expect_codec(
            pool.apply_async(take_unencodable, Unencodable).map(|_| ()),
            true,
            "argument",
            "nope",
        );
        expect_codec(
            pool.apply(take_unencodable, Unencodable),
            true,
            "argument",
            "nope",
        );
        assert_pool_fine(&pool, &workers);
    })
}

#[test]
fn argument_that_fails_to_deserialize_in_the_worker() {
    common::bounded(|| {
        let pool = pool(2);
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        let r = pool.apply_async(take_undecodable, Undecodable(5)).unwrap();
        r.wait();
        assert_eq!(r.successful(), Some(false));
        expect_codec(r.get(), false, "argument", "cannot decode 5");
        assert_pool_fine(&pool, &workers);
        expect_codec(
            pool.apply(take_undecodable, Undecodable(6)),
            false,
            "argument",
            "cannot decode 6",
        );
        assert_pool_fine(&pool, &workers);
    })
}

#[test]
fn result_that_fails_to_serialize_in_the_worker() {
    common::bounded(|| {
        let pool = pool(2);
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        let r = pool.apply_async(give_unencodable, 1).unwrap();
        r.wait();
        assert_eq!(r.successful(), Some(false));
        expect_codec(r.get(), true, "result", "nope");
        assert_pool_fine(&pool, &workers);
    })
}

#[test]
fn result_that_fails_to_deserialize_in_the_caller() {
    common::bounded(|| {
        let pool = pool(2);
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        let r = pool.apply_async(give_undecodable, 8).unwrap();
        expect_codec(r.get(), false, "result", "cannot decode 8");
        expect_codec(
            pool.apply(give_undecodable, 9),
            false,
            "result",
            "cannot decode 9",
        );
        assert_pool_fine(&pool, &workers);
    })
}

#[test]
fn many_codec_errors_in_a_row_leave_the_pool_working() {
    common::bounded(|| {
        let pool = pool(2);
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        let rs: Vec<_> = (0..30u32)
            .map(|i| match i % 3 {
                0 => pool
                    .apply_async(give_unencodable, i)
                    .unwrap()
                    .get()
                    .map(|_| 0),
                1 => pool
                    .apply_async(take_undecodable, Undecodable(i))
                    .unwrap()
                    .get(),
                _ => pool
                    .apply_async(give_undecodable, i)
                    .unwrap()
                    .get()
                    .map(|_| 0),
            })
            .collect();
        for (i, r) in rs.into_iter().enumerate() {
            assert!(r.is_err(), "task {i}: {r:?}");
        }
        assert_pool_fine(&pool, &workers);
    })
}

#[test]
fn map_returns_the_first_codec_error_in_input_order() {
    common::bounded(|| {
        let pool = pool(2);
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        // Item 3's result (1003) will not encode, in the worker, after a sleep;
        // items 13 and 27 will not decode, in the worker, at once. Item 3 comes
        // first in the input, so its error is the map's, whatever finishes first.
        for chunksize in [1, 4] {
            let m = pool
                .map_async_with(
                    picky_slow_plus,
                    (0..40).map(Picky),
                    MapOptions::new().chunksize(chunksize),
                )
                .unwrap();
            m.wait();
            assert_eq!(m.progress(), (40, 40), "every chunk finished");
            expect_codec(m.get(), true, "result", "will not encode 1003");
        }
        // Without item 3: the decode failure of item 13 is first.
        let r = pool.map_with(
            picky_plus,
            (4..40).map(Picky),
            MapOptions::new().chunksize(5),
        );
        expect_codec(r, false, "argument", "will not decode 13");
        assert_pool_fine(&pool, &workers);
        // A result that fails to decode in the caller (2013 = 1013 + 1000).
        let r = pool.map(picky_plus, (1010..1020).map(Picky));
        expect_codec(r, false, "result", "will not decode 2013");
        assert_pool_fine(&pool, &workers);
    })
}

#[test]
fn map_with_an_argument_that_fails_to_serialize() {
    common::bounded(|| {
        let pool = pool(2);
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        expect_codec(
            pool.map(picky_id, (70..80).map(Picky)),
            true,
            "argument",
            "will not encode 77",
        );
        // map_async may refuse such a map at once or fail it in get(): either
        // way the encode error is the map's.
        expect_codec(
            pool.map_async(picky_id, (70..80).map(Picky))
                .and_then(|m| m.get()),
            true,
            "argument",
            "will not encode 77",
        );
        assert_pool_fine(&pool, &workers);
        // The first error in input order wins, wherever it happened: here 77
        // (in the caller) comes before 13 (in the worker)...
        for chunksize in [1, 3] {
            expect_codec(
                pool.map_with(
                    picky_id,
                    (70..80).chain([13]).map(Picky),
                    MapOptions::new().chunksize(chunksize),
                ),
                true,
                "argument",
                "will not encode 77",
            );
            // ... and here 13 comes first.
            expect_codec(
                pool.map_with(
                    picky_id,
                    [13].into_iter().chain(70..80).map(Picky),
                    MapOptions::new().chunksize(chunksize),
                ),
                false,
                "argument",
                "will not decode 13",
            );
        }
        assert_pool_fine(&pool, &workers);
        // The items without a bad one go through.
        assert_eq!(
            pool.map(picky_id, (78..90).map(Picky)).unwrap(),
            (78..90).map(Picky).collect::<Vec<_>>()
        );
    })
}

#[test]
fn imap_fails_only_the_items_that_fail_to_serialize_or_deserialize() {
    common::bounded(|| {
        let pool = pool(2);
        let workers: HashSet<u32> = pool.worker_pids().into_iter().collect();
        // chunksize 1: exactly the bad items fail: 77 in the caller; 13 and 27
        // in the worker; 3, whose result (1003) will not encode, in the worker.
        let input: Vec<u32> = (0..30).chain(70..80).collect();
        let out: Vec<_> = pool
            .imap(picky_plus, input.iter().copied().map(Picky))
            .collect();
        assert_eq!(out.len(), input.len());
        for (&i, r) in input.iter().zip(out) {
            match i {
                3 => expect_codec(r, true, "result", "will not encode 1003"),
                77 => expect_codec(r, true, "argument", "will not encode 77"),
                13 | 27 => expect_codec(r, false, "argument", &format!("will not decode {i}")),
                _ => assert_eq!(r.unwrap(), Picky(i + 1000)),
            }
        }
        // Worker-side failures inside a chunk fail their own item only.
        let out: Vec<_> = pool
            .imap_with(
                picky_plus,
                (5..30).map(Picky),
                MapOptions::new().chunksize(4),
            )
            .collect();
        assert_eq!(out.len(), 25);
        for (i, r) in (5u32..).zip(out) {
            match i {
                13 | 27 => expect_codec(r, false, "argument", &format!("will not decode {i}")),
                _ => assert_eq!(r.unwrap(), Picky(i + 1000)),
            }
        }
        // The same in completion order.
        let mut ok = Vec::new();
        let mut bad = 0;
        for r in pool.imap_unordered(u32_to_picky, 1000..1020u32) {
            match r {
                Ok(p) => ok.push(p.0),
                Err(e) => {
                    assert!(matches!(e, Error::Encode { what: "result", .. }), "{e:?}");
                    bad += 1;
                }
            }
        }
        ok.sort_unstable();
        assert_eq!(bad, 1, "only 1003 fails to encode");
        assert_eq!(ok, (1000..1020).filter(|&i| i != 1003).collect::<Vec<_>>());
        assert_pool_fine(&pool, &workers);
    })
}
