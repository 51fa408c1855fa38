//! One decision against 10,000 machines (target: under 1 ms).
//!
//! The machines mix systems, features, mandatory features, busy slots,
//! backoff and Guix load, so that every branch of `assess` is taken; the
//! derivation needs a system and a feature that a few hundred of them have.

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use sandoff::decide::{
    decide, DrvFacts, GuixExtras, LocalFacts, Machine, MachineFormat, MachineName, MachineState,
    Policy,
};

const SYSTEMS: [&str; 4] = [
    "x86_64-linux",
    "aarch64-linux",
    "i686-linux",
    "riscv64-linux",
];
const FEATURES: [&str; 4] = ["kvm", "big-parallel", "benchmark", "nixos-test"];

fn machines(n: usize) -> Vec<Machine> {
    (0..n)
        .map(|i| {
            let systems: BTreeSet<String> = SYSTEMS
                .iter()
                .enumerate()
                .filter(|(k, _)| (i >> k) & 1 == 1 || *k == i % 4)
                .map(|(_, s)| (*s).to_owned())
                .collect();
            let supported: BTreeSet<String> = FEATURES
                .iter()
                .enumerate()
                .filter(|(k, _)| ((i / 7) >> k) & 1 == 1)
                .map(|(_, s)| (*s).to_owned())
                .collect();
            let mandatory: BTreeSet<String> = if i % 13 == 0 {
                BTreeSet::from(["benchmark".to_owned()])
            } else {
                BTreeSet::new()
            };
            Machine {
                name: MachineName::new(&format!("ssh://builder{i:05}.example.org"))
                    .expect("valid name"),
                format: MachineFormat::Nix,
                store_uri: format!("ssh://builder{i:05}.example.org"),
                host: None,
                systems,
                user: None,
                port: None,
                private_key: None,
                max_jobs: (i % 8) as u32,
                speed_factor: 1.0 + (i % 5) as f64 * 0.5,
                supported_features: supported,
                mandatory_features: mandatory,
                host_key: None,
                compression: sandoff::decide::machines::Compression::Unset,
                guix: (i % 3 == 0).then(GuixExtras::default),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let ms = machines(10_000);
    let states: Vec<MachineState<'_>> = ms
        .iter()
        .enumerate()
        .map(|(i, m)| MachineState {
            machine: m,
            slots_in_use: (i % 5) as u32,
            load: (i % 3 == 0).then_some((i % 10) as f64 / 10.0),
            in_backoff: i % 17 == 0,
            held_bytes: 0,
        })
        .collect();
    let drv = DrvFacts {
        system: "aarch64-linux".to_owned(),
        required_features: BTreeSet::from(["kvm".to_owned()]),
        prefer_local: false,
    };
    let local = LocalFacts::for_system("x86_64-linux", true);
    let policy = Policy::default();
    assert_eq!(decide(&drv, &states, &local, &policy).kind(), "remote");
    c.bench_function("decide 10000 machines", |b| {
        b.iter(|| decide(black_box(&drv), black_box(&states), &local, &policy))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
