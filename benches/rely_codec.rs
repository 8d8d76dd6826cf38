//! Question: how many RELY frames per second can one core decode and encode,
//! for the 64-byte payloads trading clients send, and what does a frame that
//! spans reads (assembled in the partial buffer) cost over one parsed in place?

use corerelay::protocol::rely::{self, Decoder, Frame};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

fn stream(frames: usize, payload: usize) -> Vec<u8> {
    let mut v = Vec::new();
    let p = vec![0x42u8; payload];
    for _ in 0..frames {
        rely::encode_transfer(
            &mut v,
            b"0f1d5c2e-aaaa-bbbb-cccc-000000000001",
            b"0f1d5c2e-aaaa-bbbb-cccc-000000000002",
            &p,
        );
    }
    v
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("rely_decode");
    for payload in [64usize, 4096] {
        let s = stream(1000, payload);
        g.throughput(Throughput::Elements(1000));
        g.bench_function(format!("in_place_{payload}B"), |b| {
            b.iter_batched_ref(
                Decoder::new,
                |d| {
                    let mut n = 0usize;
                    d.feed(&s, rely::DEFAULT_MAX_PAYLOAD, |f| {
                        if let Frame::Transfer { payload, .. } = f {
                            n += payload.len();
                        }
                        true
                    })
                    .unwrap();
                    n
                },
                BatchSize::SmallInput,
            )
        });
        // Reads of 1000 bytes: most frames straddle a read boundary.
        g.bench_function(format!("split_1000B_reads_{payload}B"), |b| {
            b.iter_batched_ref(
                Decoder::new,
                |d| {
                    let mut n = 0usize;
                    for chunk in s.chunks(1000) {
                        d.feed(chunk, rely::DEFAULT_MAX_PAYLOAD, |_| {
                            n += 1;
                            true
                        })
                        .unwrap();
                    }
                    n
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("rely_encode");
    let p = [0x42u8; 64];
    let mut out = Vec::with_capacity(256 * 1000);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("transfer_64B", |b| {
        b.iter(|| {
            out.clear();
            for _ in 0..1000 {
                rely::encode_transfer(&mut out, b"alice", b"bob", &p);
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
