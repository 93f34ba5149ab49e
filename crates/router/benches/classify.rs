//! Cost of classifying a statement, per stage.
//!
//! The server classifies every `Query` and `Parse`, so this is a per-message
//! cost on the hot path. Measured over the labelled corpus:
//!
//! - `classify/corpus_warm`: the full [`Classifier`] with a warm parser
//!   cache, i.e. what the server pays in steady state;
//! - `classify/corpus_lexer`: the lexical stage alone;
//! - `classify/pgbench_select`: one typical point query;
//! - `deep/undecided` and `deep/corpus`: the parser stage without its cache,
//!   on the statements the lexer leaves open and on the whole corpus.
//!
//! Throughput is in statements, so criterion's time divided by the element
//! count is the cost per statement. Before the groups run, the bench also
//! prints the median over statements of each stage's per-statement cost,
//! which is less dominated by the corpus's few long statements.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgsplit_router::corpus::CORPUS;
use pgsplit_router::deep::parse_kind;
use pgsplit_router::functions::WriteFunctions;
use pgsplit_router::{classify_lexical, Classifier, ClassifierConfig};

const PGBENCH_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

fn statements() -> Vec<&'static str> {
    CORPUS.iter().map(|&(sql, _)| sql).collect()
}

/// Median over `sqls` of the time one call of `f` takes, each statement
/// timed over `rounds` calls.
fn median_ns(sqls: &[&str], rounds: u32, mut f: impl FnMut(&str)) -> f64 {
    let mut per_stmt: Vec<f64> = sqls
        .iter()
        .map(|sql| {
            let start = Instant::now();
            for _ in 0..rounds {
                f(black_box(sql));
            }
            start.elapsed().as_nanos() as f64 / f64::from(rounds)
        })
        .collect();
    per_stmt.sort_by(f64::total_cmp);
    per_stmt.get(per_stmt.len() / 2).copied().unwrap_or(0.0)
}

fn print_medians() {
    let all = statements();
    let undecided: Vec<&str> = all
        .iter()
        .copied()
        .filter(|sql| classify_lexical(sql, &[]).is_none())
        .collect();
    let fns = WriteFunctions::new(&[]);
    let lexer = median_ns(&all, 2000, |sql| {
        black_box(classify_lexical(sql, &[]));
    });
    let deep_all = median_ns(&all, 20, |sql| {
        black_box(parse_kind(sql, &fns));
    });
    let deep_open = median_ns(&undecided, 20, |sql| {
        black_box(parse_kind(sql, &fns));
    });
    eprintln!(
        "median per statement over {} corpus entries: lexer {lexer:.0} ns, parser {deep_all:.0} ns \
         (parser on the {} the lexer leaves open: {deep_open:.0} ns)",
        all.len(),
        undecided.len()
    );
}

fn classify(c: &mut Criterion) {
    print_medians();
    let all = statements();
    let classifier = Classifier::new(ClassifierConfig::default());
    for sql in &all {
        classifier.classify(sql);
    }

    let mut group = c.benchmark_group("classify");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(all.len() as u64));
    group.bench_function("corpus_warm", |b| {
        b.iter(|| {
            for sql in &all {
                black_box(classifier.classify(black_box(sql)));
            }
        })
    });
    group.bench_function("corpus_lexer", |b| {
        b.iter(|| {
            for sql in &all {
                black_box(classify_lexical(black_box(sql), &[]));
            }
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("pgbench_select", |b| {
        b.iter(|| black_box(classifier.classify(black_box(PGBENCH_SELECT))))
    });
    group.finish();
}

fn deep(c: &mut Criterion) {
    let all = statements();
    let undecided: Vec<&str> = all
        .iter()
        .copied()
        .filter(|sql| classify_lexical(sql, &[]).is_none())
        .collect();
    let fns = WriteFunctions::new(&[]);

    let mut group = c.benchmark_group("deep");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(undecided.len() as u64));
    group.bench_function("undecided", |b| {
        b.iter(|| {
            for sql in &undecided {
                black_box(parse_kind(black_box(sql), &fns));
            }
        })
    });
    group.throughput(Throughput::Elements(all.len() as u64));
    group.bench_function("corpus", |b| {
        b.iter(|| {
            for sql in &all {
                black_box(parse_kind(black_box(sql), &fns));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, classify, deep);
criterion_main!(benches);
