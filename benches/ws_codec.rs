//! Question: how fast does one core parse client WebSocket frames (unmask,
//! UTF-8 check) and encode server frames, for 64-byte trading messages and
//! 4 KiB ones, whole and split across reads?

use corerelay::protocol::ws::{apply_mask, encode_frame, Decoder, Event, OP_BINARY, OP_TEXT};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

fn client_stream(n: usize, payload: usize, text: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let mask = [0x12, 0x34, 0x56, 0x78];
    let body: Vec<u8> = (0..payload).map(|i| b'a' + (i % 26) as u8).collect();
    for _ in 0..n {
        v.push(0x80 | if text { OP_TEXT } else { OP_BINARY });
        if payload < 126 {
            v.push(0x80 | payload as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload as u16).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        let at = v.len();
        v.extend_from_slice(&body);
        apply_mask(&mut v[at..], mask, 0);
    }
    v
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws_parse");
    for (payload, text) in [(64usize, true), (64, false), (4096, true)] {
        let s = client_stream(1000, payload, text);
        g.throughput(Throughput::Elements(1000));
        let kind = if text { "text" } else { "binary" };
        g.bench_function(format!("in_place_{kind}_{payload}B"), |b| {
            b.iter_batched_ref(
                || (Decoder::new(1 << 20), s.clone()),
                |(d, buf)| {
                    let mut n = 0;
                    d.feed(buf, |e| {
                        if let Event::Message { data, .. } = e {
                            n += data.len();
                        }
                        true
                    })
                    .unwrap();
                    n
                },
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("split_1000B_reads_{kind}_{payload}B"), |b| {
            b.iter_batched_ref(
                || (Decoder::new(1 << 20), s.clone()),
                |(d, buf)| {
                    let mut n = 0;
                    for chunk in buf.chunks_mut(1000) {
                        d.feed(chunk, |_| {
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
    let mut g = c.benchmark_group("ws_encode");
    let p = [0x42u8; 64];
    let mut out = Vec::with_capacity(100 * 1000);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("server_frame_64B", |b| {
        b.iter(|| {
            out.clear();
            for _ in 0..1000 {
                encode_frame(&mut out, OP_BINARY, &p);
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, parse, encode);
criterion_main!(benches);
