//! Cost of framing: splitting a captured mix of messages into zero-copy
//! frames, as the session does for client messages, and scanning headers in
//! place, as the relay does for server output. Throughput is in bytes.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgsplit_protocol::backend::TxStatus;
use pgsplit_protocol::{encode, frame};

/// 1 000 pgbench `-M extended` transactions as a client sends them.
fn client_mix() -> BytesMut {
    let mut w = BytesMut::new();
    for i in 0..1000 {
        encode::parse(
            &mut w,
            "",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
            &[],
        );
        let aid = (i * 7919 % 100_000).to_string();
        encode::bind(&mut w, "", "", &[Some(aid.as_bytes())]);
        encode::describe(&mut w, b'P', "");
        encode::execute(&mut w, "", 0);
        encode::sync(&mut w);
    }
    w
}

/// The server's answers to the same transactions.
fn server_mix() -> BytesMut {
    let mut w = BytesMut::new();
    for i in 0..1000 {
        encode::parse_complete(&mut w);
        encode::message(&mut w, b'2', |_| {});
        encode::row_description_text(&mut w, &["abalance"]);
        encode::data_row_text(&mut w, &[Some(&(i % 5000).to_string())]);
        encode::command_complete(&mut w, "SELECT 1");
        encode::ready_for_query(&mut w, TxStatus::Idle);
    }
    w
}

fn decode_all(mut buf: BytesMut) -> usize {
    let mut n = 0;
    while let Ok(Some(f)) = frame::decode(&mut buf, 1 << 26) {
        n += black_box(f).len();
    }
    n
}

/// Header scan without splitting: what the relay does before handing a run
/// of bytes on as one slice.
fn scan_all(buf: &[u8]) -> usize {
    let mut at = 0;
    let mut ready = 0;
    while let Ok(Some((tag, len))) = frame::peek(&buf[at..], 1 << 30) {
        if at + len > buf.len() {
            break;
        }
        if tag == b'Z' {
            ready += 1;
        }
        at += len;
    }
    black_box(ready)
}

fn framing(c: &mut Criterion) {
    let client = client_mix();
    let server = server_mix();
    let mut g = c.benchmark_group("framing");
    g.sample_size(30)
        .measurement_time(std::time::Duration::from_secs(2));
    g.throughput(Throughput::Bytes(client.len() as u64));
    g.bench_function("decode_client_mix", |b| {
        b.iter_batched(|| client.clone(), decode_all, BatchSize::SmallInput)
    });
    g.throughput(Throughput::Bytes(server.len() as u64));
    g.bench_function("decode_server_mix", |b| {
        b.iter_batched(|| server.clone(), decode_all, BatchSize::SmallInput)
    });
    g.bench_function("scan_server_mix", |b| b.iter(|| scan_all(&server)));
    g.finish();
}

criterion_group!(benches, framing);
criterion_main!(benches);
