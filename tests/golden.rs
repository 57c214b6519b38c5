//! Golden scenarios: touchpoints in, customers, profiles and the identity change feed out,
//! one scenario per resolution rule of README, Concepts and Matching.

mod support;

use idgraph_engine::read::{customer_for_identifier, explain};
use idgraph_engine::{StateCache, StateRead, Table};
use idgraph_model::{
    ChangeKind, FailureKind, LinkRule, ProfileRecord, RefusalRule, ResolutionAction,
};
use serde_json::{json, Value};
use support::{event, Harness};

fn ids(identifiers: Value) -> Value {
    identifiers
}

#[test]
fn a_shared_identifier_puts_two_events_in_one_profile() {
    let mut h = Harness::new();
    h.run(&[
        event(
            "e1",
            1,
            ids(json!({"email": "Ann.Lee@Example.com"})),
            json!({}),
        ),
        event(
            "e2",
            2,
            ids(json!({"email": " ann.lee@example.COM ", "phone": "+1 415 639 0100"})),
            json!({}),
        ),
    ]);
    assert_eq!(h.customer("e1"), h.customer("e2"));
    assert_eq!(h.enriched("e1").resolution.action, ResolutionAction::New);
    assert_eq!(
        h.enriched("e2").resolution.action,
        ResolutionAction::Matched
    );
    assert_eq!(
        h.enriched("e2").resolution.rule,
        LinkRule::SharedIdentifier {
            kind: "email".into(),
            value: "ann.lee@example.com".into()
        }
    );
    let profile = h.profile(&h.customer("e1"));
    let held: Vec<(&str, &str)> = profile
        .identifiers
        .iter()
        .map(|i| (i.kind.as_str(), i.value.as_str()))
        .collect();
    assert_eq!(
        held,
        vec![("email", "ann.lee@example.com"), ("phone", "+14156390100")]
    );
    let created = h.changes_of_type("created");
    assert_eq!(created.len(), 1);
    let added = h.changes_of_type("identifier_added");
    assert!(
        added.iter().any(|c| matches!(&c.change,
        ChangeKind::IdentifierAdded { kind, rule: LinkRule::CoOccurrence, .. } if kind == "phone"))
    );
}

#[test]
fn links_are_transitive_across_events() {
    let mut h = Harness::new();
    h.run(&[
        event("e1", 1, json!({"email": "a@x.com"}), json!({})),
        event(
            "e2",
            2,
            json!({"email": "a@x.com", "phone": "+1 415 639 0101"}),
            json!({}),
        ),
        event(
            "e3",
            3,
            json!({"phone": "+14156390101", "user_id": "u-1"}),
            json!({}),
        ),
        event("e4", 4, json!({"user_id": "u-1"}), json!({})),
    ]);
    let first = h.customer("e1");
    for id in ["e2", "e3", "e4"] {
        assert_eq!(h.customer(id), first, "{id}");
    }
    assert_eq!(h.profile(&first).identifiers.len(), 3);
}

#[test]
fn a_merge_keeps_the_oldest_id_and_the_absorbed_id_redirects() {
    let mut h = Harness::new();
    h.run(&[event("e1", 1, json!({"email": "a@x.com"}), json!({}))]);
    h.run(&[event(
        "e2",
        2,
        json!({"phone": "+1 415 639 0102"}),
        json!({}),
    )]);
    let (older, younger) = (h.customer("e1"), h.customer("e2"));
    assert_ne!(older, younger);
    h.run(&[event(
        "e3",
        3,
        json!({"phone": "+1 415 639 0102", "email": "a@x.com"}),
        json!({}),
    )]);
    let merged = h.enriched("e3");
    assert_eq!(merged.customer_id, older);
    assert_eq!(merged.resolution.action, ResolutionAction::Merged);
    assert_eq!(merged.resolution.merged_ids, vec![younger.clone()]);
    // The change feed says who survived and who was absorbed.
    let merges = h.changes_of_type("merged");
    assert_eq!(merges.len(), 1);
    match &merges[0].change {
        ChangeKind::Merged {
            survivor, absorbed, ..
        } => {
            assert_eq!(survivor, &older);
            assert_eq!(absorbed, &vec![younger.clone()]);
        }
        other => panic!("unexpected {other:?}"),
    }
    // The profile topic gets a tombstone for the absorbed id, pointing at the survivor.
    let tombstone = h
        .profiles
        .iter()
        .find(|p| p.customer_id == younger && p.profile.is_none())
        .unwrap();
    assert_eq!(tombstone.merged_into.as_deref(), Some(older.as_str()));
    // The absorbed id stays resolvable.
    assert_eq!(h.profile(&younger).customer_id, older);
    assert_eq!(h.profile(&older).absorbed_ids, vec![younger]);
    assert_eq!(h.profile(&older).computed.event_count, 3);
}

#[test]
fn a_merge_past_a_per_kind_limit_is_refused_and_reported() {
    let mut h = Harness::new();
    h.run(&[
        event(
            "e1",
            1,
            json!({"user_id": "u-1", "email": "a@x.com"}),
            json!({}),
        ),
        event(
            "e2",
            2,
            json!({"user_id": "u-2", "email": "b@x.com"}),
            json!({}),
        ),
        event("e3", 3, json!({"email": ["a@x.com", "b@x.com"]}), json!({})),
    ]);
    assert_ne!(
        h.customer("e1"),
        h.customer("e2"),
        "two user ids never merge"
    );
    let refused = &h.enriched("e3").resolution.refused;
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].rule, RefusalRule::KindLimit);
    assert_eq!(refused[0].kind.as_deref(), Some("user_id"));
    let change = h.changes_of_type("merge_refused");
    assert!(matches!(
        &change[0].change,
        ChangeKind::MergeRefused {
            rule: RefusalRule::KindLimit,
            ..
        }
    ));
}

#[test]
fn a_refused_merge_attaches_the_event_to_its_highest_priority_identifier() {
    let mut h = Harness::new();
    h.run(&[
        event("e1", 1, json!({"user_id": "u-1"}), json!({})),
        event(
            "e2",
            2,
            json!({"user_id": "u-2", "phone": "+1 415 639 0103"}),
            json!({}),
        ),
        // The phone points at u-2's profile, the user id at u-1's; user_id outranks phone.
        event(
            "e3",
            3,
            json!({"user_id": "u-1", "phone": "+1 415 639 0103"}),
            json!({}),
        ),
    ]);
    assert_eq!(h.customer("e3"), h.customer("e1"));
    assert_ne!(h.customer("e1"), h.customer("e2"));
}

#[test]
fn a_device_shared_by_two_known_customers_does_not_merge_them() {
    let mut h = Harness::new();
    h.run(&[
        event(
            "e1",
            1,
            json!({"email": "a@x.com", "device_id": "tablet-1"}),
            json!({}),
        ),
        event("e2", 2, json!({"email": "b@x.com"}), json!({})),
        event(
            "e3",
            3,
            json!({"email": "b@x.com", "device_id": "tablet-1"}),
            json!({}),
        ),
    ]);
    assert_ne!(h.customer("e1"), h.customer("e3"));
    assert_eq!(h.customer("e2"), h.customer("e3"));
    assert_eq!(
        h.enriched("e3").resolution.refused[0].rule,
        RefusalRule::WeakIdentifier
    );
    assert_eq!(h.refusal_changes(), [RefusalRule::WeakIdentifier]);
}

#[test]
fn a_value_seen_on_many_customers_becomes_generic_and_stops_linking() {
    let mut h = Harness::new();
    let call_centre = "+1 212 639 0100";
    let people = [
        ("a@x.com", "Ann", "Lee"),
        ("b@x.com", "Bob", "Stone"),
        ("c@x.com", "Cy", "Young"),
        ("d@x.com", "Di", "Ng"),
    ];
    let mut n = 0;
    for (email, first, last) in people {
        n += 1;
        h.run(&[event(
            &format!("known-{email}"),
            n,
            json!({"email": email}),
            json!({"first_name": first, "last_name": last}),
        )]);
    }
    for (email, first, last) in people {
        n += 1;
        h.run(&[event(
            &format!("call-{email}"),
            n,
            json!({"email": email, "phone": call_centre}),
            json!({"first_name": first, "last_name": last}),
        )]);
    }
    let customers: std::collections::BTreeSet<String> = people
        .iter()
        .map(|(e, _, _)| h.customer(&format!("call-{e}")))
        .collect();
    assert_eq!(customers.len(), 4, "the call-centre phone merged nobody");
    assert_eq!(h.changes_of_type("identifier_generic").len(), 1);
    // Each link refused before the value became generic was reported.
    assert_eq!(
        h.refusal_changes(),
        [
            RefusalRule::ConflictingTraits,
            RefusalRule::ConflictingTraits
        ]
    );
    // Once generic, the value links nothing: an event with only that phone is a new profile.
    h.run(&[event(
        "phone-only",
        99,
        json!({"phone": call_centre}),
        json!({}),
    )]);
    assert_eq!(
        h.enriched("phone-only").resolution.action,
        ResolutionAction::New
    );
}

#[test]
fn a_profile_larger_than_the_maximum_is_refused() {
    let mut h = Harness::with(|c| c.protection.max_profile_identifiers = 3);
    h.run(&[
        event(
            "e1",
            1,
            json!({"email": "a@x.com", "phone": "+1 415 639 0104"}),
            json!({}),
        ),
        event(
            "e2",
            2,
            json!({"email": "b@x.com", "phone": "+1 415 639 0105"}),
            json!({}),
        ),
        event("e3", 3, json!({"email": ["a@x.com", "b@x.com"]}), json!({})),
    ]);
    assert_ne!(h.customer("e1"), h.customer("e2"));
    assert_eq!(
        h.enriched("e3").resolution.refused[0].rule,
        RefusalRule::MaxProfileSize
    );
    assert_eq!(h.refusal_changes(), [RefusalRule::MaxProfileSize]);
}

fn person(first: &str, last: &str, dob: &str, street: &str, postcode: &str) -> Value {
    json!({"first_name": first, "last_name": last, "date_of_birth": dob, "street": street, "city": "Springfield", "postcode": postcode})
}

#[test]
fn a_nickname_and_a_typo_still_link_by_fuzzy_match_with_the_scores_recorded() {
    let mut h = Harness::new();
    h.run(&[event(
        "e1",
        1,
        json!({"email": "robert@x.com"}),
        person("Robert", "Smith", "1975-06-01", "12 High Street", "62701"),
    )]);
    h.run(&[event(
        "e2",
        2,
        json!({"email": "bob.work@y.com"}),
        person("Bob", "Smyth", "01/06/1975", "12 high st.", "62701"),
    )]);
    assert_eq!(h.customer("e1"), h.customer("e2"));
    match &h.enriched("e2").resolution.rule {
        LinkRule::Fuzzy { score, fields } => {
            assert!(*score >= 15.0, "score {score}");
            let first = fields.iter().find(|f| f.field == "first_name").unwrap();
            assert_eq!(first.level, "nickname");
            let last = fields.iter().find(|f| f.field == "last_name").unwrap();
            assert_eq!(last.level, "one_edit");
            let dob = fields.iter().find(|f| f.field == "date_of_birth").unwrap();
            assert_eq!(dob.level, "exact");
        }
        other => panic!("expected a fuzzy link, got {other:?}"),
    }
}

#[test]
fn a_namesake_with_another_birth_date_and_address_stays_apart() {
    let mut h = Harness::new();
    h.run(&[event(
        "e1",
        1,
        json!({"email": "robert@x.com"}),
        person("Robert", "Smith", "1975-06-01", "12 High Street", "62701"),
    )]);
    h.run(&[event(
        "e2",
        2,
        json!({"email": "other@y.com"}),
        person("Robert", "Smith", "1988-11-23", "9 Low Road", "62704"),
    )]);
    assert_ne!(h.customer("e1"), h.customer("e2"));
}

#[test]
fn a_candidate_is_compared_as_it_is_now_after_the_cache_dropped_it() {
    // Decoded profiles are dropped after every batch and match features are kept: a
    // candidate scored once from its features must be scored from its new values after it
    // changed, or the last event would miss it.
    let mut h = Harness::new();
    h.cache = StateCache::with_budgets(1, 1 << 30);
    let ann = |extra: Value| {
        let mut traits = json!({"first_name": "Ann", "last_name": "Lee"});
        traits
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        traits
    };
    let filler = |h: &mut Harness, id: &str, n: u32| {
        h.run_one(
            id,
            n,
            json!({"email": format!("{id}@filler.com")}),
            json!({}),
        );
    };
    h.run_one("e1", 1, json!({"email": "a@x.com"}), ann(json!({})));
    filler(&mut h, "f1", 2);
    filler(&mut h, "f2", 3);
    // A namesake: first and last name alone stay below the threshold, so it starts its
    // own profile, and the first one is compared (from its features) on the way.
    h.run_one(
        "e2",
        4,
        json!({"email": "b@y.com"}),
        ann(json!({"date_of_birth": "1990-01-01"})),
    );
    assert_ne!(h.customer("e1"), h.customer("e2"));
    // The first customer comes back with an address.
    h.run_one(
        "e3",
        5,
        json!({"email": "a@x.com"}),
        ann(json!({"street": "12 High Street", "postcode": "62701"})),
    );
    assert_eq!(h.customer("e1"), h.customer("e3"));
    filler(&mut h, "f3", 6);
    filler(&mut h, "f4", 7);
    h.run_one(
        "e4",
        8,
        json!({}),
        ann(json!({"street": "12 High Street", "postcode": "62701"})),
    );
    assert_eq!(
        h.customer("e4"),
        h.customer("e1"),
        "name and address link the anonymous event to the customer as they are now"
    );
}

#[test]
fn an_anonymous_cookie_that_logs_in_joins_the_known_customer() {
    let mut h = Harness::new();
    h.run(&[
        event(
            "known",
            1,
            json!({"user_id": "u-7", "email": "g@x.com"}),
            json!({}),
        ),
        event("anon-1", 2, json!({"cookie_id": "ck-1"}), json!({})),
        event("anon-2", 3, json!({"cookie_id": "ck-1"}), json!({})),
    ]);
    let anonymous = h.customer("anon-1");
    assert_ne!(anonymous, h.customer("known"));
    h.run(&[event(
        "login",
        4,
        json!({"cookie_id": "ck-1", "user_id": "u-7"}),
        json!({}),
    )]);
    let known = h.customer("known");
    assert_eq!(h.customer("login"), known);
    assert_eq!(
        h.profile(&anonymous).customer_id,
        known,
        "the anonymous profile was merged into the known one"
    );
}

#[test]
fn junk_values_never_link_and_are_reported() {
    let mut h = Harness::new();
    h.run(&[
        event(
            "e1",
            1,
            json!({"email": "test@test.com", "phone": "000-000-0000", "user_id": "undefined"}),
            json!({}),
        ),
        event(
            "e2",
            2,
            json!({"email": "test@test.com", "phone": "000-000-0000", "user_id": "undefined"}),
            json!({}),
        ),
    ]);
    assert_ne!(h.customer("e1"), h.customer("e2"));
    assert_eq!(h.enriched("e1").quality_issues.len(), 3);
}

#[test]
fn replaying_an_event_is_a_duplicate_that_changes_nothing() {
    let mut h = Harness::new();
    let e = event(
        "e1",
        1,
        json!({"email": "a@x.com"}),
        json!({"first_name": "Ann"}),
    );
    h.run(std::slice::from_ref(&e));
    let before = h.profile(&h.customer("e1"));
    h.run(&[e]);
    assert_eq!(
        h.enriched.last().unwrap().resolution.action,
        ResolutionAction::Duplicate
    );
    assert_eq!(h.profile(&h.customer("e1")), before);
}

/// `count` page views of distinct new people on `day` of March 2026.
fn later_traffic(first: u32, count: u32, day: u32) -> Vec<Value> {
    (first..first + count)
        .map(|k| {
            let mut e = event(
                &format!("later{k}"),
                k,
                json!({"email": format!("p{k}@x.com")}),
                json!({}),
            );
            e["timestamp"] = json!(format!("2026-03-{day:02}T12:00:00Z"));
            e
        })
        .collect()
}

#[test]
fn a_resent_event_is_a_duplicate_within_the_window_and_new_after_it() {
    let e1 = event("e1", 1, json!({"email": "a@x.com"}), json!({}));
    let mut h = Harness::new();
    h.run(std::slice::from_ref(&e1));
    // A week of traffic later (the window is 7 days of event time): still a duplicate.
    h.run(&later_traffic(0, 150, 7));
    h.run(std::slice::from_ref(&e1));
    assert_eq!(
        h.enriched.last().unwrap().resolution.action,
        ResolutionAction::Duplicate
    );
    // Ten days later the first copy has left the window: its record is gone from the store,
    // and the same event counts again (it joins its profile through the email).
    h.run(&later_traffic(150, 150, 11));
    let key = idgraph_engine::state::event_key("web", "e1");
    assert_eq!(h.store.get(Table::Events, key.as_bytes()).unwrap(), None);
    h.run(std::slice::from_ref(&e1));
    assert_eq!(
        h.enriched.last().unwrap().resolution.action,
        ResolutionAction::Matched
    );
    // Its own event time is outside the window too, so its new record goes at once.
    assert_eq!(h.store.get(Table::Events, key.as_bytes()).unwrap(), None);

    // With window_days = 0 an event id is remembered for ever.
    let mut forever = Harness::with(|c| c.duplicates.window_days = 0);
    forever.run(std::slice::from_ref(&e1));
    forever.run(&later_traffic(0, 300, 28));
    forever.run(&[e1]);
    assert_eq!(
        forever.enriched.last().unwrap().resolution.action,
        ResolutionAction::Duplicate
    );
}

#[test]
fn evidence_past_its_retention_leaves_explain_but_the_profile_stays() {
    let mut h = Harness::with(|c| c.retention.evidence_days = 30);
    h.run_one("e1", 1, json!({"email": "a@x.com"}), json!({}));
    h.run_one(
        "e2",
        2,
        json!({"email": "a@x.com", "phone": "+14155550100"}),
        json!({}),
    );
    let customer = h.customer("e1");
    let before = explain(&h.store, &customer).unwrap().unwrap();
    assert!(before.evidence.len() >= 2, "{:?}", before.evidence);
    // Ten days later the evidence is inside its 30 days; forty days later it is not.
    h.run(&later_traffic(0, 150, 11));
    assert_eq!(
        explain(&h.store, &customer)
            .unwrap()
            .unwrap()
            .evidence
            .len(),
        before.evidence.len()
    );
    let mut much_later = later_traffic(150, 150, 1);
    for e in &mut much_later {
        e["timestamp"] = json!("2026-04-20T12:00:00Z");
    }
    h.run(&much_later);
    let after = explain(&h.store, &customer).unwrap().unwrap();
    assert!(after.evidence.is_empty(), "{:?}", after.evidence);
    // The profile and its links are kept whatever their age.
    assert_eq!(h.profile(&customer).identifiers.len(), 2);
    h.run_one("e3", 3, json!({"phone": "+1 415 555 0100"}), json!({}));
    assert_eq!(h.current_customer("e3"), customer);
}

#[test]
fn a_few_events_with_clocks_in_the_future_do_not_close_the_window() {
    let e1 = event("e1", 1, json!({"email": "a@x.com"}), json!({}));
    let mut h = Harness::new();
    h.run(std::slice::from_ref(&e1));
    h.run(&later_traffic(0, 150, 2));
    // 99 devices with their clocks years ahead.
    let mut future = later_traffic(150, 99, 2);
    for e in &mut future {
        e["timestamp"] = json!("2031-01-01T00:00:00Z");
    }
    h.run(&future);
    h.run(&[e1]);
    assert_eq!(
        h.enriched.last().unwrap().resolution.action,
        ResolutionAction::Duplicate
    );
}

#[test]
fn computed_traits_add_up_orders_value_channels_and_listening_figures() {
    let mut h = Harness::new();
    let mut order = event(
        "t1",
        1,
        json!({"email": "a@x.com"}),
        json!({"first_name": "Ann"}),
    );
    order["source"] = json!("transaction");
    order["event_type"] = json!("order_completed");
    order["properties"] = json!({"amount": 19.99, "currency": "usd"});
    let mut second = order.clone();
    second["event_id"] = json!("t2");
    second["timestamp"] = json!("2026-03-02T12:00:00Z");
    second["properties"] = json!({"amount": 5.01, "currency": "USD"});
    let mut mention = event("l1", 3, json!({"email": "a@x.com"}), json!({}));
    mention["source"] = json!("listening");
    mention["properties"] = json!({"followers": 1200, "sentiment": -0.4});
    h.run(&[order, second, mention]);
    let profile = h.profile(&h.customer("t1"));
    assert_eq!(profile.computed.order_count, 2);
    assert_eq!(profile.computed.lifetime_value_minor["USD"], 2500);
    assert_eq!(
        profile.computed.channels.iter().collect::<Vec<_>>(),
        vec!["listening", "transaction"]
    );
    assert_eq!(
        profile.computed.follower_reach.as_ref().unwrap().value,
        1200.0
    );
    assert_eq!(
        profile.computed.latest_sentiment.as_ref().unwrap().value,
        -0.4
    );
    assert_eq!(profile.traits["first_name"].value, "Ann");
    assert_eq!(profile.traits["first_name"].source, "transaction");
}

#[test]
fn bad_messages_are_dead_lettered_with_reason_and_line_and_the_rest_is_processed() {
    let mut h = Harness::new();
    let good = serde_json::to_vec(&event("ok", 1, json!({"email": "a@x.com"}), json!({}))).unwrap();
    h.run_raw(&[
        b"{not json".to_vec(),
        good,
        b"\xff\xfe\x00".to_vec(),
        br#"{"event_type":"x","timestamp":"2026-03-01T12:00:00Z"}"#.to_vec(),
    ]);
    assert_eq!(h.enriched.len(), 1);
    let kinds: Vec<FailureKind> = h.dead_letters.iter().map(|d| d.failure_kind).collect();
    assert_eq!(
        kinds,
        vec![
            FailureKind::InvalidJson,
            FailureKind::InvalidUtf8,
            FailureKind::MissingField
        ]
    );
    let lines: Vec<String> = h
        .dead_letters
        .iter()
        .map(|d| d.meta.input.display())
        .collect();
    assert_eq!(
        lines,
        vec!["golden.jsonl:1", "golden.jsonl:3", "golden.jsonl:4"]
    );
    assert!(h.dead_letters[2].reason.contains("event_id"));
    assert_eq!(h.dead_letters[1].payload_encoding, "base64");
}

#[test]
fn explain_names_the_events_and_rules_that_built_a_profile() {
    let mut h = Harness::new();
    h.run(&[event("e1", 1, json!({"email": "a@x.com"}), json!({}))]);
    h.run(&[event(
        "e2",
        2,
        json!({"phone": "+1 415 639 0106"}),
        json!({}),
    )]);
    h.run(&[event(
        "e3",
        3,
        json!({"phone": "+1 415 639 0106", "email": "a@x.com"}),
        json!({}),
    )]);
    let customer = h.customer("e3");
    let explanation = explain(&h.store, &customer).unwrap().unwrap();
    assert_eq!(explanation.customer_id, customer);
    let phone = explanation
        .paths
        .iter()
        .find(|p| p.member.starts_with("phone:"))
        .expect("the phone has a path");
    assert!(phone.steps.iter().any(|s| s.event_id == "e3"), "{phone:?}");
    let normalizer = h.engine.normalizer().clone();
    assert_eq!(
        customer_for_identifier(&h.store, &normalizer, "phone", "(415) 639-0106").unwrap(),
        Some(customer)
    );
}

#[test]
fn a_shared_phone_with_another_name_behind_it_is_refused_once_as_conflicting_traits() {
    let mut h = Harness::new();
    let call_centre = "+1 212 639 0100";
    h.run(&[event(
        "ann",
        1,
        json!({"email": "ann@x.com", "phone": call_centre}),
        person("Ann", "Lee", "1980-02-29", "12 High St", "62701"),
    )]);
    h.run(&[event(
        "bob",
        2,
        json!({"email": "bob@y.com", "phone": call_centre}),
        person("Bob", "Stone", "1971-09-14", "9 Low Rd", "62704"),
    )]);
    assert_ne!(h.customer("ann"), h.customer("bob"));
    let refused = &h.enriched("bob").resolution.refused;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].rule, RefusalRule::ConflictingTraits);
    assert_eq!(
        refused[0].other_customer_id.as_deref(),
        Some(h.customer("ann").as_str())
    );
    assert_eq!(h.changes_of_type("merge_refused").len(), 1);
}

#[test]
fn a_merge_into_the_older_profile_emits_the_survivors_new_profile() {
    let mut h = Harness::new();
    // The older profile holds only an email; the younger one the user id that outranks it.
    h.run(&[event("old", 1, json!({"email": "a@x.com"}), json!({}))]);
    h.run(&[event("young", 2, json!({"user_id": "u-1"}), json!({}))]);
    let (older, younger) = (h.customer("old"), h.customer("young"));
    let before = h.profiles.len();
    h.run(&[event(
        "login",
        3,
        json!({"user_id": "u-1", "email": "a@x.com"}),
        json!({}),
    )]);
    assert_eq!(h.customer("login"), older, "the older profile survives");
    let emitted: Vec<&ProfileRecord> = h.profiles[before..].iter().collect();
    let survivor = emitted
        .iter()
        .find(|r| r.customer_id == older && r.profile.is_some())
        .expect("the survivor's changed profile is emitted");
    assert_eq!(
        survivor
            .profile
            .as_ref()
            .unwrap()
            .decode()
            .unwrap()
            .absorbed_ids,
        vec![younger.clone()]
    );
    assert!(emitted
        .iter()
        .any(|r| r.customer_id == younger && r.merged_into.as_deref() == Some(older.as_str())));
}

#[test]
fn a_source_with_a_field_mapping_is_read_in_its_own_format() {
    let mut h = Harness::with(|c| {
        c.mappings.insert(
            "web".into(),
            idgraph_model::FieldMapping {
                event_id: "/id".into(),
                event_type: "/kind".into(),
                timestamp: "/at".into(),
                identifiers: [("/contact/mail".to_owned(), "email".to_owned())].into(),
                traits: [("/person/given".to_owned(), "first_name".to_owned())].into(),
                properties: None,
            },
        );
    });
    let native = |id: &str, mail: &str| json!({"id": id, "kind": "signup", "at": "2026-03-01T12:00:00Z", "contact": {"mail": mail}, "person": {"given": "Ann"}});
    h.run(&[
        native("n1", "Ann@X.com"),
        native("n2", "ann@x.com"),
        json!({"kind": "signup", "at": "2026-03-01T12:00:00Z"}),
    ]);
    assert_eq!(
        h.customer("n1"),
        h.customer("n2"),
        "the mapped email links them"
    );
    assert_eq!(h.enriched("n1").traits["first_name"], "ann");
    assert_eq!(h.dead_letters.len(), 1);
    assert_eq!(h.dead_letters[0].field.as_deref(), Some("/id"));
}
