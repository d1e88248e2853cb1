//! Property tests: the record reader and name validation never panic on any input, and
//! every rejection is a usage error (exit 2) with a message; every valid name gives a
//! valid host name; the escaping sink never lets a hidden character through.

use proptest::prelude::*;
use tpl_common::hostname::{hostname_for, hostname_problem};
use tpl_common::names::{validate_name, MAX_NAME_BYTES};
use tpl_common::record::{parse_line, read_records};
use tpl_common::text::{escape, is_hidden, list, shown};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_line_parses_or_is_exit_2_naming_the_line(line in any::<String>(), n in 1usize..100000) {
        match parse_line(&line, n) {
            Ok(r) => prop_assert!(r.uuid.as_deref().is_some_and(|u| !u.is_empty())
                || r.name.as_deref().is_some_and(|u| !u.is_empty())),
            Err(e) => {
                prop_assert_eq!(e.exit_code(), 2);
                let msg = e.to_string();
                prop_assert!(msg.contains(&format!("line {n}")), "{}", msg);
            }
        }
    }

    #[test]
    fn json_shaped_garbage_is_handled(
        key in prop_oneof![Just("name".to_string()), Just("uuid".to_string()), Just("uri".to_string()), "[a-z]{1,5}"],
        val in prop_oneof![
            Just("null".to_string()), Just("1e999".to_string()), Just("[]".to_string()),
            Just("{}".to_string()), "\"[^\"\\\\]{0,80}\"", "-?[0-9]{1,30}",
        ],
    ) {
        let line = format!("{{\"{key}\":{val}}}");
        if let Err(e) = parse_line(&line, 3) {
            prop_assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn arbitrary_bytes_on_stdin_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        for r in read_records(&bytes[..]) {
            if let Err(e) = r {
                prop_assert_eq!(e.exit_code(), 2);
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn names_are_accepted_only_when_every_rule_holds(name in any::<String>()) {
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && !name.contains('/')
            && !name.starts_with('.')
            && !name.starts_with('-')
            && !name.chars().any(is_hidden);
        match validate_name("clone name", &name) {
            Ok(()) => prop_assert!(ok, "accepted {:?}", name),
            Err(e) => {
                prop_assert!(!ok, "rejected {:?}: {}", name, e);
                prop_assert_eq!(e.exit_code(), 2);
                prop_assert!(e.to_string().starts_with("invalid clone name"));
            }
        }
    }

    #[test]
    fn hostile_path_like_names_are_rejected(
        pre in "[a-z]{0,3}",
        sep in prop_oneof![Just('/'), Just('\0'), Just('\n'), Just('\t'), Just('\x7f')],
        post in "[a-z]{0,3}",
    ) {
        let name = format!("{pre}{sep}{post}");
        prop_assert!(validate_name("name", &name).is_err());
    }

    #[test]
    fn every_valid_name_gives_a_valid_host_name(name in any::<String>(), other in any::<String>()) {
        if validate_name("clone name", &name).is_ok() {
            let h = hostname_for(&name);
            prop_assert!(hostname_problem(&h).is_none(), "{:?} -> {:?}", name, h);
            if validate_name("clone name", &other).is_ok() && other != name {
                prop_assert_ne!(h, hostname_for(&other), "{:?} and {:?}", name, other);
            }
        }
    }

    #[test]
    fn names_close_to_each_other_give_distinct_host_names(
        stem in "[a-zA-Z0-9]{1,20}",
        a in prop_oneof![Just('_'), Just('-'), Just(' '), Just('.'), Just('~'), Just('é')],
        b in prop_oneof![Just('_'), Just('-'), Just(' '), Just('.'), Just('~'), Just('é')],
    ) {
        let (x, y) = (format!("{stem}{a}1"), format!("{stem}{b}1"));
        if x != y {
            prop_assert_ne!(hostname_for(&x), hostname_for(&y));
        }
    }

    #[test]
    fn the_escaping_sink_never_emits_a_hidden_character(s in any::<String>()) {
        for out in [escape(&s).into_owned(), shown(&s), escape(&list([&s, &s], "; ")).into_owned()] {
            prop_assert!(!out.chars().any(is_hidden), "{:?} -> {:?}", s, out);
        }
    }
}
