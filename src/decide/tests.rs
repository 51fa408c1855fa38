//! Table tests for every rule of [`decide`], and properties over random
//! machines.

use super::*;
use proptest::prelude::*;

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn machine(name: &str, systems: &[&str], max_jobs: u32, speed: f64) -> Machine {
    Machine {
        name: MachineName::new(name).unwrap(),
        format: MachineFormat::Nix,
        store_uri: format!("ssh://{name}"),
        host: Some(name.to_owned()),
        systems: set(systems),
        user: None,
        port: None,
        private_key: None,
        max_jobs,
        speed_factor: speed,
        supported_features: BTreeSet::new(),
        mandatory_features: BTreeSet::new(),
        host_key: None,
        compression: machines::Compression::Unset,
        guix: None,
    }
}

fn drv(system: &str, features: &[&str]) -> DrvFacts {
    DrvFacts {
        system: system.to_owned(),
        required_features: set(features),
        prefer_local: false,
    }
}

fn local() -> LocalFacts {
    LocalFacts::for_system("x86_64-linux", false)
}

/// The decision for `d` with the one machine `m`, idle, and this host.
fn with_one(m: Machine, d: &DrvFacts, policy: &Policy) -> Decision {
    decide(d, &[MachineState::idle(&m)], &local(), policy)
}

fn remote(d: &Decision) -> &str {
    d.machine().map(MachineName::as_str).unwrap_or("-")
}

#[test]
fn local_only_goes_local_when_local_can() {
    let m = machine("a", &["x86_64-linux"], 1, 1.0);
    let policy = Policy {
        local_only: true,
        ..Policy::default()
    };
    let d = with_one(m, &drv("x86_64-linux", &[]), &policy);
    assert_eq!(d.kind(), "local", "{d}");
}

#[test]
fn local_only_fails_when_local_cannot() {
    let m = machine("a", &["aarch64-linux"], 1, 1.0);
    let policy = Policy {
        local_only: true,
        ..Policy::default()
    };
    let d = with_one(m, &drv("aarch64-linux", &[]), &policy);
    assert_eq!(d.kind(), "fail");
    assert!(d.reason().contains("aarch64-linux"), "{d}");
}

#[test]
fn prefer_local_build_goes_local_when_possible() {
    let m = machine("a", &["x86_64-linux"], 1, 9.0);
    let mut d0 = drv("x86_64-linux", &[]);
    d0.prefer_local = true;
    assert_eq!(with_one(m.clone(), &d0, &Policy::default()).kind(), "local");
}

#[test]
fn prefer_local_build_fails_when_local_cannot() {
    // Local-build derivations are never offloaded: with a machine that
    // could build it, the decision still fails and says why.
    let m = machine("a", &["aarch64-linux"], 1, 1.0);
    let mut d0 = drv("aarch64-linux", &[]);
    d0.prefer_local = true;
    let d = with_one(m.clone(), &d0, &Policy::default());
    assert_eq!(d.kind(), "fail");
    assert!(d.reason().contains("local-build"), "{}", d.reason());
    assert!(d.reason().contains("aarch64-linux"), "{}", d.reason());
}

#[test]
fn eligibility_table() {
    let mut kvm = machine("kvm", &["x86_64-linux"], 1, 1.0);
    kvm.supported_features = set(&["kvm"]);
    let mut bench = machine("bench", &["x86_64-linux"], 1, 1.0);
    bench.mandatory_features = set(&["benchmark"]);
    let plain = machine("plain", &["x86_64-linux", "i686-linux"], 1, 1.0);
    let arm = machine("arm", &["aarch64-linux"], 1, 1.0);
    let cases: &[(&Machine, DrvFacts, bool, Option<Ineligible>)] = &[
        (&plain, drv("x86_64-linux", &[]), false, None),
        (&plain, drv("i686-linux", &[]), false, None),
        (
            &arm,
            drv("x86_64-linux", &[]),
            false,
            Some(Ineligible::System),
        ),
        (&arm, drv("builtin", &[]), false, None),
        (
            &plain,
            drv("x86_64-linux", &["kvm"]),
            false,
            Some(Ineligible::MissingFeatures(vec!["kvm".into()])),
        ),
        (&kvm, drv("x86_64-linux", &["kvm"]), false, None),
        (&kvm, drv("x86_64-linux", &[]), false, None),
        (
            &bench,
            drv("x86_64-linux", &[]),
            false,
            Some(Ineligible::UnrequiredMandatory(vec!["benchmark".into()])),
        ),
        // A mandatory feature counts as supported.
        (&bench, drv("x86_64-linux", &["benchmark"]), false, None),
        (
            &plain,
            drv("x86_64-linux", &[]),
            true,
            Some(Ineligible::Backoff),
        ),
    ];
    for (m, d, backoff, want) in cases {
        let st = MachineState {
            in_backoff: *backoff,
            held_bytes: 0,
            ..MachineState::idle(m)
        };
        let got = assess(d, &st);
        match want {
            None => assert_eq!(got, Standing::Available, "{} {d:?}", m.name),
            Some(w) => assert_eq!(got, Standing::Ineligible(w.clone()), "{} {d:?}", m.name),
        }
    }
}

#[test]
fn choice_order_table() {
    // (name, max_jobs, speed, slots_in_use)
    type Row = (&'static str, u32, f64, u32);
    let cases: &[(&[Row], &str)] = &[
        // Lowest load / speed wins.
        (&[("a", 4, 1.0, 1), ("b", 4, 4.0, 2)], "b"),
        // Equal load/speed (0): higher speed wins.
        (&[("a", 4, 1.0, 0), ("b", 4, 2.0, 0)], "b"),
        // Equal ratio (1/1 = 2/2) and speed differ: higher speed wins.
        (&[("a", 4, 1.0, 1), ("b", 4, 2.0, 2)], "b"),
        // Same ratio and speed: fewer slots in use... (ratio equal implies
        // equal load here), then name.
        (&[("b", 4, 1.0, 1), ("a", 4, 1.0, 1)], "a"),
        // Full machines are skipped even if fastest.
        (&[("fast", 1, 10.0, 1), ("slow", 1, 1.0, 0)], "slow"),
        // max_jobs 0: never a free slot.
        (&[("zero", 0, 10.0, 0), ("one", 1, 1.0, 0)], "one"),
    ];
    for (rows, want) in cases {
        let ms: Vec<Machine> = rows
            .iter()
            .map(|(n, j, s, _)| machine(n, &["x86_64-linux"], *j, *s))
            .collect();
        let st: Vec<MachineState<'_>> = ms
            .iter()
            .zip(rows.iter())
            .map(|(m, r)| MachineState {
                slots_in_use: r.3,
                ..MachineState::idle(m)
            })
            .collect();
        let d = decide(&drv("x86_64-linux", &[]), &st, &local(), &Policy::default());
        assert_eq!(remote(&d), *want, "{rows:?}: {d}");
    }
}

#[test]
fn overloaded_guix_machine_is_skipped() {
    let mut busy = machine("busy", &["x86_64-linux"], 4, 5.0);
    busy.guix = Some(GuixExtras::default());
    let idle = machine("idle", &["x86_64-linux"], 4, 1.0);
    let st = [
        MachineState {
            load: Some(0.9),
            ..MachineState::idle(&busy)
        },
        MachineState::idle(&idle),
    ];
    let d = decide(&drv("x86_64-linux", &[]), &st, &local(), &Policy::default());
    assert_eq!(remote(&d), "idle");
    // Below the threshold it is used; with the threshold off (#f) too.
    let st0 = [MachineState {
        load: Some(0.5),
        ..MachineState::idle(&busy)
    }];
    assert_eq!(
        remote(&decide(
            &drv("x86_64-linux", &[]),
            &st0,
            &local(),
            &Policy::default()
        )),
        "busy"
    );
    busy.guix = Some(GuixExtras {
        overload_threshold: None,
        ..GuixExtras::default()
    });
    let st1 = [MachineState {
        load: Some(1.0),
        ..MachineState::idle(&busy)
    }];
    assert_eq!(
        remote(&decide(
            &drv("x86_64-linux", &[]),
            &st1,
            &local(),
            &Policy::default()
        )),
        "busy"
    );
}

#[test]
fn no_eligible_machine_builds_locally_when_it_can() {
    let m = machine("arm", &["aarch64-linux"], 1, 1.0);
    let d = with_one(m.clone(), &drv("x86_64-linux", &[]), &Policy::default());
    assert_eq!(d.kind(), "local");
    assert!(d.reason().contains("no machine builds x86_64-linux"), "{d}");
    // Extra platform.
    assert_eq!(
        with_one(m, &drv("i686-linux", &[]), &Policy::default()).kind(),
        "local"
    );
    // No machines at all.
    assert_eq!(
        decide(&drv("x86_64-linux", &[]), &[], &local(), &Policy::default()),
        Decision::Local {
            reason: "no build machines are configured".into()
        }
    );
}

#[test]
fn fail_names_the_missing_system() {
    let m = machine("x", &["x86_64-linux"], 1, 1.0);
    let d = with_one(m, &drv("riscv64-linux", &[]), &Policy::default());
    assert_eq!(
        d,
        Decision::Fail {
            reason: "cannot build riscv64-linux derivation: no machine builds riscv64-linux, and the local machine cannot build it (it is x86_64-linux, i686-linux and the derivation needs riscv64-linux)".into()
        }
    );
}

#[test]
fn fail_names_the_missing_features() {
    let m = machine("arm", &["aarch64-linux"], 1, 1.0);
    let d = with_one(
        m,
        &drv("aarch64-linux", &["kvm", "gpu"]),
        &Policy::default(),
    );
    assert_eq!(d.kind(), "fail");
    assert!(
        d.reason()
            .contains("no aarch64-linux machine has the feature(s) gpu, kvm"),
        "{d}"
    );
    // Locally the system is fine but features are missing.
    let d = decide(
        &drv("x86_64-linux", &["gpu"]),
        &[],
        &local(),
        &Policy::default(),
    );
    assert!(d.reason().contains("lacks the feature(s) gpu"), "{d}");
}

#[test]
fn fail_names_mandatory_features_and_backoff() {
    let mut a = machine("a", &["aarch64-linux"], 1, 1.0);
    a.mandatory_features = set(&["benchmark"]);
    let b = machine("b", &["aarch64-linux"], 1, 1.0);
    let st = [
        MachineState::idle(&a),
        MachineState {
            in_backoff: true,
            ..MachineState::idle(&b)
        },
    ];
    let d = decide(
        &drv("aarch64-linux", &[]),
        &st,
        &local(),
        &Policy::default(),
    );
    assert_eq!(d.kind(), "fail");
    assert!(
        d.reason()
            .contains("a requires mandatory feature(s) benchmark; b is in backoff"),
        "{d}"
    );
}

#[test]
fn all_busy_postpones() {
    let m = [machine("a", &["x86_64-linux"], 2, 1.0)];
    let st = [MachineState {
        slots_in_use: 2,
        ..MachineState::idle(&m[0])
    }];
    let d = decide(&drv("x86_64-linux", &[]), &st, &local(), &Policy::default());
    assert_eq!(d.kind(), "postpone", "{d}");
}

#[test]
fn all_busy_with_local_when_busy_builds_locally_if_a_slot_is_free() {
    let m = [machine("a", &["x86_64-linux", "aarch64-linux"], 1, 1.0)];
    let st = [MachineState {
        slots_in_use: 1,
        ..MachineState::idle(&m[0])
    }];
    let policy = Policy {
        local_when_busy: true,
        ..Policy::default()
    };
    let d = decide(&drv("x86_64-linux", &[]), &st, &local(), &policy);
    assert_eq!(d.kind(), "local");
    let mut full = local();
    full.free_slot = false;
    assert_eq!(
        decide(&drv("x86_64-linux", &[]), &st, &full, &policy).kind(),
        "postpone"
    );
    // The local machine cannot build aarch64: wait for the machine.
    assert_eq!(
        decide(&drv("aarch64-linux", &[]), &st, &local(), &policy).kind(),
        "postpone"
    );
}

#[test]
fn explain_reports_each_machine() {
    let a = machine("a", &["x86_64-linux"], 1, 1.0);
    let b = machine("b", &["aarch64-linux"], 1, 1.0);
    let v = explain(
        &drv("x86_64-linux", &[]),
        &[MachineState::idle(&a), MachineState::idle(&b)],
    );
    assert!(v[0].eligible);
    assert!(!v[1].eligible);
    assert_eq!(
        v[1].reason,
        "does not build x86_64-linux (systems: aarch64-linux)"
    );
}

#[test]
fn local_defaults_follow_nix() {
    let l = LocalFacts::for_system("x86_64-linux", true);
    assert_eq!(
        l.features,
        set(&["benchmark", "big-parallel", "kvm", "nixos-test"])
    );
    assert_eq!(l.extra_platforms, set(&["i686-linux"]));
    assert!(!LocalFacts::for_system("aarch64-linux", false)
        .features
        .contains("kvm"));
}

const SYSTEMS: [&str; 3] = ["x86_64-linux", "aarch64-linux", "i686-linux"];
const FEATURES: [&str; 4] = ["kvm", "big-parallel", "benchmark", "gpu"];

fn arb_machine() -> impl Strategy<Value = (Machine, u32, Option<f64>, bool)> {
    (
        "[a-e]{1,3}",
        proptest::sample::subsequence(SYSTEMS.to_vec(), 0..=3),
        proptest::sample::subsequence(FEATURES.to_vec(), 0..=4),
        proptest::sample::subsequence(FEATURES.to_vec(), 0..=2),
        0u32..4,
        prop_oneof![Just(1.0), Just(2.0), Just(0.5), 0.1f64..10.0],
        0u32..5,
        proptest::option::of(0.0f64..1.0),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(name, systems, supported, mandatory, jobs, speed, used, load, backoff, guix)| {
                let mut m = machine(&name, &systems, jobs, speed);
                m.supported_features = set(&supported);
                m.mandatory_features = set(&mandatory);
                if guix {
                    m.guix = Some(GuixExtras::default());
                }
                (m, used, load, backoff)
            },
        )
}

fn arb_drv() -> impl Strategy<Value = DrvFacts> {
    (
        proptest::sample::select(SYSTEMS.to_vec()),
        proptest::sample::subsequence(FEATURES.to_vec(), 0..=3),
        any::<bool>(),
    )
        .prop_map(|(s, f, p)| DrvFacts {
            system: s.to_owned(),
            required_features: set(&f),
            prefer_local: p,
        })
}

proptest! {
    #[test]
    fn remote_choice_is_always_a_valid_machine(
        ms in proptest::collection::vec(arb_machine(), 0..8),
        d in arb_drv(),
        local_when_busy in any::<bool>(),
        free_slot in any::<bool>(),
    ) {
        // Unique names: the decision names its machine.
        let ms: Vec<_> = ms
            .into_iter()
            .enumerate()
            .map(|(i, (mut m, u, l, b))| {
                m.name = MachineName::new(&format!("{}{i}", m.name)).unwrap();
                (m, u, l, b)
            })
            .collect();
        let st: Vec<MachineState<'_>> = ms
            .iter()
            .map(|(m, used, load, backoff)| MachineState {
                machine: m,
                slots_in_use: *used,
                load: *load,
                in_backoff: *backoff,
                held_bytes: 0,
            })
            .collect();
        let mut l = local();
        l.free_slot = free_slot;
        let policy = Policy { local_only: false, local_when_busy };
        let decision = decide(&d, &st, &l, &policy);
        if let Decision::Remote { machine, .. } = &decision {
            let chosen = st.iter().find(|s| &s.machine.name == machine).unwrap();
            let m = chosen.machine;
            // Never a machine lacking the system or a required feature.
            prop_assert!(m.systems.contains(&d.system));
            for f in &d.required_features {
                prop_assert!(m.supported_features.contains(f) || m.mandatory_features.contains(f));
            }
            // Never a violated mandatory feature.
            prop_assert!(m.mandatory_features.is_subset(&d.required_features));
            // Never more than its slots, never in backoff or overloaded.
            prop_assert!(chosen.slots_in_use < m.max_jobs);
            prop_assert!(!chosen.in_backoff);
            if let (Some(load), Some(t)) = (chosen.load, m.overload_threshold()) {
                prop_assert!(load < t);
            }
        }
        // Local only when the local machine can build it.
        if decision.kind() == "local" {
            prop_assert!(l.cannot_build(&d).is_none());
        }
        // Deterministic, and independent of the order of the machines
        // (the name breaks every tie).
        prop_assert_eq!(&decide(&d, &st, &l, &policy), &decision);
        let mut rev = st.clone();
        rev.reverse();
        prop_assert_eq!(decide(&d, &rev, &l, &policy), decision);
    }

    #[test]
    fn local_only_never_offloads(
        ms in proptest::collection::vec(arb_machine(), 0..6),
        d in arb_drv(),
    ) {
        let st: Vec<MachineState<'_>> = ms.iter().map(|(m, ..)| MachineState::idle(m)).collect();
        let policy = Policy { local_only: true, local_when_busy: false };
        let kind = decide(&d, &st, &local(), &policy).kind();
        prop_assert!(kind == "local" || kind == "fail");
    }

    #[test]
    fn local_build_derivations_are_never_offloaded(
        ms in proptest::collection::vec(arb_machine(), 0..6),
        mut d in arb_drv(),
        local_when_busy in any::<bool>(),
    ) {
        d.prefer_local = true;
        let st: Vec<MachineState<'_>> = ms.iter().map(|(m, ..)| MachineState::idle(m)).collect();
        let policy = Policy { local_only: false, local_when_busy };
        let decision = decide(&d, &st, &local(), &policy);
        let kind = decision.kind();
        prop_assert!(kind == "local" || kind == "fail");
        prop_assert_eq!(kind == "local", local().cannot_build(&d).is_none());
    }
}

proptest! {
    #[test]
    fn fast_path_agrees_with_assess(
        (m, used, load, backoff) in arb_machine(),
        d in arb_drv(),
    ) {
        let st = MachineState { machine: &m, slots_in_use: used, load, in_backoff: backoff, held_bytes: 0 };
        let slow = match assess(&d, &st) {
            Standing::Ineligible(_) => "ineligible",
            Standing::Full | Standing::Overloaded { .. } => "busy",
            Standing::Available => "available",
        };
        let fast = match quick_standing(&d, &st) {
            Quick::Ineligible => "ineligible",
            Quick::Busy => "busy",
            Quick::Available => "available",
        };
        prop_assert_eq!(slow, fast);
    }
}

#[test]
fn max_jobs_zero_offloads_or_fails() {
    let m = [machine("a", &["x86_64-linux"], 1, 1.0)];
    let mut local = local();
    local.disabled = true;
    let policy = Policy::default();
    let d = decide(
        &drv("x86_64-linux", &[]),
        &[MachineState::idle(&m[0])],
        &local,
        &policy,
    );
    assert_eq!(remote(&d), "a");
    let d = decide(
        &drv("aarch64-linux", &[]),
        &[MachineState::idle(&m[0])],
        &local,
        &policy,
    );
    match d {
        Decision::Fail { reason } => {
            assert!(reason.contains("local builds are disabled"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn among_equally_good_machines_the_one_holding_more_inputs_wins() {
    let ms = [
        machine("a", &["x86_64-linux"], 2, 1.0),
        machine("b", &["x86_64-linux"], 2, 1.0),
        machine("c", &["x86_64-linux"], 2, 2.0),
    ];
    let held = |a: u64, b: u64, c_used: u32| {
        [
            MachineState {
                held_bytes: a,
                ..MachineState::idle(&ms[0])
            },
            MachineState {
                held_bytes: b,
                ..MachineState::idle(&ms[1])
            },
            MachineState {
                slots_in_use: c_used,
                ..MachineState::idle(&ms[2])
            },
        ]
    };
    let pick = |st: &[MachineState<'_>]| {
        decide(&drv("x86_64-linux", &[]), st, &local(), &Policy::default())
    };
    // c is faster and idle: held bytes never beat a better machine.
    assert_eq!(remote(&pick(&held(0, 5 << 20, 0))), "c");
    // c full: a and b tie, and b holds more.
    let d = pick(&held(0, 5 << 20, 2));
    assert_eq!(remote(&d), "b", "{d}");
    assert!(
        d.reason().contains("holds 5.0 MiB of the input closure"),
        "{d}"
    );
    assert_eq!(remote(&pick(&held(7, 5, 2))), "a");
    // Nothing known: the name decides, as before.
    assert_eq!(remote(&pick(&held(0, 0, 2))), "a");
    let v = explain(&drv("x86_64-linux", &[]), &held(0, 5 << 20, 2));
    assert_eq!(v[1].held_bytes, 5 << 20);
    assert!(v[1].reason.contains("holds 5.0 MiB"), "{}", v[1].reason);
}
