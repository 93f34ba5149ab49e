//! What recording one statement's latency costs on the relay path: the
//! proxy's own histogram (`stats::Latency`: fixed buckets, atomic adds)
//! against the `metrics` crate's histogram handle with
//! `metrics-exporter-prometheus` installed as the recorder, the maintained
//! crate pgsplit would otherwise use for exposition. Both are recorded
//! from two threads at once as well, as two workers do.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pgsplit_server::stats::Latency;

fn bench(c: &mut Criterion) {
    let d = Duration::from_micros(180);
    let ours = Arc::new(Latency::default());
    c.bench_function("latency/own atomic histogram", |b| {
        b.iter(|| ours.observe(black_box(d)));
    });

    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 10.0,
        ])
        .expect("buckets")
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("one recorder");
    let h = metrics::histogram!("pgsplit_statement_duration_seconds",
        "target" => "replica", "reason" => "read");
    c.bench_function("latency/metrics-exporter-prometheus handle", |b| {
        b.iter(|| h.record(black_box(d).as_secs_f64()));
    });
    c.bench_function("latency/metrics-exporter-prometheus macro per call", |b| {
        b.iter(|| {
            metrics::histogram!("pgsplit_statement_duration_seconds",
                "target" => "replica", "reason" => "read")
            .record(black_box(d).as_secs_f64());
        });
    });

    // Two threads recording at once (two workers): time per record on
    // this thread while another records the same series.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (name, own) in [("own atomic histogram", true), ("metrics handle", false)] {
        stop.store(false, std::sync::atomic::Ordering::Relaxed);
        let (s, o, h2) = (stop.clone(), ours.clone(), h.clone());
        let other = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if own {
                    o.observe(d);
                } else {
                    h2.record(d.as_secs_f64());
                }
            }
        });
        c.bench_function(&format!("latency/{name}, two threads"), |b| {
            if own {
                b.iter(|| ours.observe(black_box(d)));
            } else {
                b.iter(|| h.record(black_box(d).as_secs_f64()));
            }
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        other.join().expect("recorder thread");
    }
    // The exposition drains what the handle buffered (it keeps every
    // sample until a scrape): render once so memory is given back.
    black_box(handle.render().len());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
