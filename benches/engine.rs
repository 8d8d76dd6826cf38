//! Questions:
//! - selector: how long does a core take to evaluate an admin /send
//!   selector (AND of two tags) on its tag index with 10 000 connections?
//! - directory: what does the per-core lookup cache save over the locked
//!   directory lookup on the relay hot path?
//! - hand-off: what does handing a batch to another core cost (bounded
//!   channel + wake-only-if-parked), per message, with both threads busy?

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use corerelay::engine::directory::{Directory, LookupCache};
use corerelay::engine::mesh::{Inbox, Item, Outgoing};
use corerelay::engine::tags::{Tag, TagIndex, TagList};
use corerelay::engine::ConnId;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn selector(c: &mut Criterion) {
    let mut ix = TagIndex::default();
    for slot in 0..10_000usize {
        let tags: Vec<Tag> = vec![
            ("room".into(), format!("r{}", slot % 100).into()),
            (
                "role".into(),
                if slot % 10 == 0 { "admin" } else { "user" }.into(),
            ),
        ];
        ix.insert(slot, &mut TagList::from(tags));
    }
    let want: Vec<Tag> = vec![
        ("role".into(), "admin".into()),
        ("room".into(), "r20".into()),
    ];
    let mut out = Vec::with_capacity(1000);
    c.bench_function("selector_and_of_two_tags_10k_conns", |b| {
        b.iter(|| {
            out.clear();
            ix.select(&want, &mut out);
            out.len()
        })
    });
}

fn directory(c: &mut Criterion) {
    let dir = Directory::new(2);
    let ids: Vec<String> = (0..1000)
        .map(|i| format!("0f1d5c2e-aaaa-bbbb-cccc-{i:012}"))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        dir.login(
            id.as_bytes(),
            ConnId {
                core: (i % 2) as u16,
                slot: i as u32,
                gen: 1,
            },
        );
    }
    let mut g = c.benchmark_group("directory_lookup");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("locked", |b| {
        b.iter(|| {
            ids.iter()
                .filter(|id| dir.lookup(id.as_bytes()).is_some())
                .count()
        })
    });
    let mut cache = LookupCache::default();
    g.bench_function("per_core_cache", |b| {
        b.iter(|| {
            ids.iter()
                .filter(|id| cache.lookup(&dir, id.as_bytes()).is_some())
                .count()
        })
    });
    g.finish();
}

fn handoff(c: &mut Criterion) {
    // Two cores: this thread sends batches of 64 messages to a receiver
    // thread that drains its inbox as a core does.
    let poll = mio::Poll::new().unwrap();
    let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
    let (inbox, rx) = Inbox::new(256, waker);
    let dummy_poll = mio::Poll::new().unwrap();
    let dummy = mio::Waker::new(dummy_poll.registry(), mio::Token(0)).unwrap();
    let (me, _my_rx) = Inbox::new(256, dummy);
    let inboxes: Arc<[Inbox]> = Arc::from(vec![me, inbox]);
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let receiver = std::thread::spawn(move || {
        let mut n = 0u64;
        while !st.load(Ordering::Relaxed) {
            while let Ok(batch) = rx.try_recv() {
                n += batch
                    .items
                    .iter()
                    .filter(|i| matches!(i, Item::Deliver { .. }))
                    .count() as u64;
            }
            std::hint::spin_loop();
        }
        n
    });
    let mut out = Outgoing::new(inboxes, 0);
    let to = ConnId {
        core: 1,
        slot: 7,
        gen: 1,
    };
    let msg = [0x42u8; 80];
    let mut g = c.benchmark_group("cross_core_handoff");
    g.throughput(Throughput::Elements(64));
    g.bench_function("batch_of_64_x_80B", |b| {
        b.iter(|| {
            for _ in 0..64 {
                out.deliver(1, to, &[&msg]);
            }
            out.flush()
        })
    });
    g.finish();
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join();
}

criterion_group!(benches, selector, directory, handoff);
criterion_main!(benches);
