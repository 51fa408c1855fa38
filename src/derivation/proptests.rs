//! Property tests: printing then parsing is the identity, and no input makes
//! the readers panic.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn store_path(suffix: &'static str) -> impl Strategy<Value = StorePath> {
    ("[0-9a-df-np-sv-z]{32}", "[a-z0-9][a-z0-9+._?=-]{0,12}").prop_map(move |(hash, name)| {
        StorePath::from_base_name(&format!("{hash}-{name}{suffix}")).unwrap()
    })
}

fn output_name() -> impl Strategy<Value = OutputName> {
    "[a-z][a-z0-9]{0,5}".prop_map(|n| OutputName::new(&n).unwrap())
}

fn hash() -> impl Strategy<Value = Hash> {
    (
        prop_oneof![
            Just(HashAlgo::Md5),
            Just(HashAlgo::Sha1),
            Just(HashAlgo::Sha256),
            Just(HashAlgo::Sha512)
        ],
        any::<[u8; 64]>(),
    )
        .prop_map(|(algo, bytes)| Hash::from_bytes(algo, &bytes[..algo.size()]).unwrap())
}

fn method() -> impl Strategy<Value = FileIngestionMethod> {
    prop_oneof![
        Just(FileIngestionMethod::Flat),
        Just(FileIngestionMethod::Recursive)
    ]
}

fn outputs() -> impl Strategy<Value = BTreeMap<OutputName, DerivationOutput>> {
    prop_oneof![
        proptest::collection::btree_map(
            output_name(),
            store_path("").prop_map(|path| DerivationOutput::InputAddressed { path }),
            1..4
        ),
        proptest::collection::btree_set(output_name(), 1..4).prop_map(|names| names
            .into_iter()
            .map(|n| (n, DerivationOutput::Deferred))
            .collect()),
        (method(), hash(), store_path("")).prop_map(|(method, hash, path)| {
            [(
                OutputName::out(),
                DerivationOutput::CAFixed { method, hash, path },
            )]
            .into()
        }),
        (method(), hash()).prop_map(|(method, h)| {
            [(
                OutputName::out(),
                DerivationOutput::CAFloating {
                    method,
                    algo: h.algo(),
                },
            )]
            .into()
        }),
        (method(), hash()).prop_map(|(method, h)| {
            [(
                OutputName::out(),
                DerivationOutput::Impure {
                    method,
                    algo: h.algo(),
                },
            )]
            .into()
        }),
    ]
}

fn derivation(
    bytes: BoxedStrategy<Vec<u8>>,
    system: BoxedStrategy<Vec<u8>>,
) -> impl Strategy<Value = Derivation> {
    (
        outputs(),
        proptest::collection::btree_map(
            store_path(".drv"),
            proptest::collection::btree_set(output_name(), 0..3),
            0..3,
        ),
        proptest::collection::btree_set(store_path(""), 0..3),
        system,
        bytes.clone(),
        proptest::collection::vec(bytes.clone(), 0..4),
        proptest::collection::btree_map(bytes.clone(), bytes, 0..6),
    )
        .prop_map(
            |(outputs, input_derivations, input_sources, system, builder, args, env)| Derivation {
                outputs,
                input_derivations,
                input_sources,
                system,
                builder,
                args,
                env,
            },
        )
}

fn any_bytes() -> BoxedStrategy<Vec<u8>> {
    // Weighted towards the bytes the escaping has to get right.
    let byte = prop_oneof![
        4 => any::<u8>(),
        1 => prop::sample::select(b"\"\\\n\r\t,()[]".to_vec()),
    ];
    proptest::collection::vec(byte, 0..12).boxed()
}

fn system_bytes() -> BoxedStrategy<Vec<u8>> {
    proptest::collection::vec(
        any::<u8>().prop_filter("printed unescaped", |b| *b != b'"' && *b != b'\\'),
        0..12,
    )
    .boxed()
}

proptest! {
    #[test]
    fn aterm_print_then_parse_is_identity(drv in derivation(any_bytes(), system_bytes())) {
        for dir in [StoreDir::default(), StoreDir::new("/gnu/store").unwrap()] {
            let printed = drv.to_aterm(&dir);
            let back = Derivation::from_aterm(&printed, &dir).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back, &drv);
            prop_assert_eq!(back.to_aterm(&dir), printed);
        }
    }

    #[test]
    fn json_show_then_read_is_identity(
        drv in derivation(any_bytes(), system_bytes()),
        path in store_path(".drv"),
    ) {
        // Any bytes, not only UTF-8: the reader takes what `show` writes.
        let dir = StoreDir::default();
        let shown = json::show(&[(path.clone(), drv.clone())].into(), &dir);
        let back = json::from_json(&shown, &dir).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.key, Some(dir.display(&path)));
        prop_assert_eq!(back.name.as_str(), name_from_drv_path(&path).unwrap());
        prop_assert_eq!(back.derivation, drv);
    }

    #[test]
    fn aterm_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = Derivation::from_aterm(&bytes, &StoreDir::default());
        let mut prefixed = b"Derive([".to_vec();
        prefixed.extend_from_slice(&bytes);
        let _ = Derivation::from_aterm(&prefixed, &StoreDir::default());
    }

    #[test]
    fn aterm_parser_survives_mutations(
        drv in derivation(any_bytes(), system_bytes()),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let dir = StoreDir::default();
        let mut bytes = drv.to_aterm(&dir);
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(d) = Derivation::from_aterm(&bytes, &dir) {
            // Whatever is accepted prints back to the same bytes.
            prop_assert_eq!(d.to_aterm(&dir), bytes);
        }
    }

    #[test]
    fn json_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = json::from_json(&bytes, &StoreDir::default());
    }
}

#[test]
fn input_sets_are_sorted_like_nix() {
    // BTreeSet<StorePath> sorts by base name = full path order in one store dir.
    let a = StorePath::from_base_name("00000000000000000000000000000000-z").unwrap();
    let b = StorePath::from_base_name("10000000000000000000000000000000-a").unwrap();
    let set: BTreeSet<_> = [b.clone(), a.clone()].into();
    assert_eq!(set.into_iter().collect::<Vec<_>>(), [a, b]);
}
