//! Matching scenarios: pairs of records that must link whatever corruption one of them
//! carries, near-misses that must stay apart, and a `merge_refused` record for every rule
//! that keeps two profiles apart (README, Matching).

mod support;

use idgraph_engine::read::explain;
use idgraph_model::{ChangeKind, LinkRule, RefusalRule};
use serde_json::{json, Map, Value};
use support::Harness;

/// A complete, clean person record.
fn ann() -> Map<String, Value> {
    json!({
        "first_name": "Annabel", "last_name": "Whitfield", "date_of_birth": "1984-03-07",
        "street": "42 Kingsley Road", "address_line2": "Rosedale Court", "city": "Bristol",
        "postcode": "40215", "state": "Avon"
    })
    .as_object()
    .unwrap()
    .clone()
}

/// `ann()` with some fields replaced (a null value removes the field).
fn ann_with(changes: Value) -> Value {
    let mut traits = ann();
    for (field, value) in changes.as_object().unwrap() {
        if value.is_null() {
            traits.remove(field);
        } else {
            traits.insert(field.clone(), value.clone());
        }
    }
    Value::Object(traits)
}

/// A harness that has resolved the clean record, as event "clean", with `identifiers`.
fn after_clean_record(identifiers: Value) -> Harness {
    let mut h = Harness::new();
    h.run_one("clean", 1, identifiers, Value::Object(ann()));
    h
}

/// Runs the clean record (with an email), then `other` (with no identifier), and says
/// whether they ended up in one profile.
fn links(other: Value) -> bool {
    let mut h = after_clean_record(json!({"email": "annabel@example.com"}));
    h.run_one("other", 2, json!({}), other);
    h.current_customer("clean") == h.current_customer("other")
}

#[test]
fn every_kind_of_corruption_still_links() {
    let corruptions = [
        (
            "keyboard typo in the surname",
            json!({"last_name": "Whitfiekd"}),
        ),
        (
            "letters transposed in the first name",
            json!({"first_name": "Annaebl"}),
        ),
        (
            "scanner misreading d as cl",
            json!({"street": "42 Kingsley Roacl"}),
        ),
        ("phonetic spelling", json!({"first_name": "Anabelle"})),
        (
            "nickname",
            json!({"first_name": "Annie", "last_name": "Whitfield"}),
        ),
        ("initial only", json!({"first_name": "A."})),
        (
            "first and last name swapped",
            json!({"first_name": "Whitfield", "last_name": "Annabel"}),
        ),
        ("first name missing", json!({"first_name": null})),
        ("birth date missing", json!({"date_of_birth": null})),
        (
            "day and month swapped",
            json!({"date_of_birth": "1984-07-03"}),
        ),
        (
            "one digit of the birth date off",
            json!({"date_of_birth": "1984-03-09"}),
        ),
        (
            "two digits of the year transposed",
            json!({"date_of_birth": "1948-03-07"}),
        ),
        (
            "street typo and postcode digit off",
            json!({"street": "42 Kingsly Road", "postcode": "40216"}),
        ),
        (
            "street and second address line swapped",
            json!({"street": "Rosedale Court", "address_line2": "42 Kingsley Road"}),
        ),
        (
            "moved house",
            json!({"street": "7 Harbour View", "address_line2": null, "postcode": "40877"}),
        ),
        (
            "a typo in three fields",
            json!({"first_name": "Anabel", "last_name": "Witfield", "city": "Bristel"}),
        ),
    ];
    let missed: Vec<&str> = corruptions
        .iter()
        .filter(|(_, changes)| !links(ann_with(changes.clone())))
        .map(|(name, _)| *name)
        .collect();
    assert!(
        missed.is_empty(),
        "these corruptions did not link: {missed:?}"
    );
}

#[test]
fn the_fuzzy_link_records_each_fields_level_and_weight() {
    let mut h = after_clean_record(json!({"email": "annabel@example.com"}));
    h.run_one(
        "typo",
        2,
        json!({}),
        ann_with(json!({"last_name": "Whitfiekd", "date_of_birth": "1984-07-03"})),
    );
    let LinkRule::Fuzzy { score, fields } = &h.enriched("typo").resolution.rule else {
        panic!("expected a fuzzy link: {:?}", h.enriched("typo").resolution);
    };
    let level = |field: &str| {
        fields
            .iter()
            .find(|f| f.field == field)
            .map(|f| f.level.as_str())
    };
    assert_eq!(level("last_name"), Some("one_edit"));
    assert_eq!(level("date_of_birth"), Some("day_month_swapped"));
    assert_eq!(level("first_name"), Some("exact"));
    let sum: f64 = fields.iter().map(|f| f.weight).sum();
    assert!(
        (sum - score).abs() < 0.01,
        "the weights add up to the score: {sum} vs {score}"
    );
}

#[test]
fn twins_with_their_own_emails_stay_apart() {
    let mut h = Harness::new();
    h.run_one(
        "ann",
        1,
        json!({"email": "annabel@example.com"}),
        Value::Object(ann()),
    );
    h.run_one(
        "twin",
        2,
        json!({"email": "beatrice.w@example.org"}),
        ann_with(json!({"first_name": "Beatrice"})),
    );
    assert_ne!(h.current_customer("ann"), h.current_customer("twin"));
    let refused = &h.enriched("twin").resolution.refused;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].rule, RefusalRule::ConflictingTraits);
    assert_eq!(h.changes_of_type("merge_refused").len(), 1);
}

/// A CRM export writes the same person as `Doe, Jane` born `4/2/71`; the web form wrote
/// `Jane` `Doe` born 1971-02-04 at an older address. Read as people read them, the two
/// records match.
#[test]
fn a_full_name_and_a_two_digit_year_match_the_parts_they_stand_for() {
    let web = json!({"first_name": "Jane", "last_name": "Doe", "date_of_birth": "1971-02-04",
        "street": "14 Larch Road", "city": "Leeds", "postcode": "LS6 2AB"});
    // She has moved since: only her name, birth date and city link the two.
    let crm = json!({"name": "Doe, Jane", "date_of_birth": "4/2/71",
        "street": "3 Cliff Mount", "city": "Leeds", "postcode": "LS6 2HS"});
    let mut h = Harness::new();
    h.run_one("web", 1, json!({}), web);
    h.run_one("crm", 2, json!({}), crm);
    assert_eq!(h.current_customer("web"), h.current_customer("crm"));
}

#[test]
fn a_father_and_son_with_jr_stay_apart() {
    let father = json!({"first_name": "Robert", "last_name": "Kowalski", "date_of_birth": "1958-09-02",
        "street": "9 Elm Street", "city": "Dayton", "postcode": "45402"});
    let son = json!({"first_name": "Robert", "last_name": "Kowalski Jr", "date_of_birth": "1986-04-30",
        "street": "9 Elm Street", "city": "Dayton", "postcode": "45402"});
    let mut h = Harness::new();
    h.run_one("father", 1, json!({}), father);
    h.run_one("son", 2, json!({}), son);
    assert_ne!(h.current_customer("father"), h.current_customer("son"));
}

#[test]
fn a_family_sharing_one_email_is_refused_as_conflicting_traits() {
    let mut h = Harness::new();
    let family = json!({"email": "the.whitfields@example.com"});
    h.run_one("ann", 1, family.clone(), Value::Object(ann()));
    h.run_one(
        "dad",
        2,
        family,
        ann_with(json!({"first_name": "Gerald", "date_of_birth": "1951-11-08"})),
    );
    assert_ne!(h.customer("ann"), h.customer("dad"));
    let refused = &h.enriched("dad").resolution.refused;
    assert_eq!(
        refused[0].rule,
        RefusalRule::ConflictingTraits,
        "{refused:?}"
    );
    assert_eq!(h.changes_of_type("merge_refused").len(), 1);
}

#[test]
fn an_identical_national_id_links_through_typos_in_name_and_birth_date() {
    let mut h = after_clean_record(json!({"national_id": "5779612"}));
    h.run_one(
        "typos",
        2,
        json!({"national_id": "5779612"}),
        ann_with(
            json!({"first_name": "Anabel", "last_name": "Whitfeld", "date_of_birth": "1984-03-01"}),
        ),
    );
    assert_eq!(h.customer("clean"), h.customer("typos"));
    assert!(h.enriched("typos").resolution.refused.is_empty());
}

#[test]
fn a_national_id_one_edit_away_is_a_typo_scored_with_the_traits_and_reported() {
    let mut h = after_clean_record(json!({"national_id": "5779612"}));
    h.run_one(
        "typo",
        2,
        json!({"national_id": "5797612"}),
        ann_with(json!({"street": "42 Kingsly Road"})),
    );
    assert_eq!(h.customer("clean"), h.customer("typo"));
    let LinkRule::Fuzzy { fields, .. } = &h.enriched("typo").resolution.rule else {
        panic!("expected a fuzzy link");
    };
    let id = fields
        .iter()
        .find(|f| f.field == "national_id")
        .expect("the id was compared");
    assert_eq!(id.level, "one_edit");
    // The profile keeps one national id; the mistyped one is refused, visibly.
    let refused = &h.enriched("typo").resolution.refused;
    assert_eq!(refused[0].rule, RefusalRule::KindLimit, "{refused:?}");
    assert_eq!(h.changes_of_type("merge_refused").len(), 1);
}

#[test]
fn a_clearly_different_user_id_refuses_a_fuzzy_match_and_says_so() {
    let mut h = after_clean_record(json!({"user_id": "u-1001"}));
    h.run_one(
        "other",
        2,
        json!({"user_id": "u-7734"}),
        Value::Object(ann()),
    );
    assert_ne!(h.customer("clean"), h.customer("other"));
    let refused = &h.enriched("other").resolution.refused;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].rule, RefusalRule::KindLimit);
    assert_eq!(
        refused[0].other_customer_id.as_deref(),
        Some(h.customer("clean").as_str())
    );
    let change = &h.changes_of_type("merge_refused")[0].change;
    assert!(
        matches!(change, ChangeKind::MergeRefused { linking_kind, .. } if linking_kind == "fuzzy"),
        "{change:?}"
    );
}

#[test]
fn an_event_that_matches_two_profiles_bridges_them_whatever_came_first() {
    // Two records of one person that do not match each other (another surname spelling and
    // another address), and a third that matches both.
    let first = ann_with(
        json!({"last_name": "Whitfeeld", "street": "7 Harbour View", "address_line2": null, "postcode": "40877"}),
    );
    let second = ann_with(json!({"first_name": "A.", "date_of_birth": null}));
    let third = Value::Object(ann());
    let mut h = Harness::new();
    h.run_one(
        "first",
        1,
        json!({"email": "a.whitfield@example.com"}),
        first,
    );
    h.run_one("second", 2, json!({"phone": "+1 415 555 0199"}), second);
    assert_ne!(
        h.current_customer("first"),
        h.current_customer("second"),
        "they do not match alone"
    );
    h.run_one("third", 3, json!({}), third);
    assert_eq!(h.current_customer("first"), h.current_customer("second"));
    assert_eq!(h.current_customer("third"), h.current_customer("first"));
    assert_eq!(h.changes_of_type("merged").len(), 1);
    // `explain` says which fields carried the merge.
    let explanation = explain(&h.store, &h.current_customer("third"))
        .unwrap()
        .unwrap();
    let fuzzy_steps: Vec<&str> = explanation
        .paths
        .iter()
        .flat_map(|path| &path.steps)
        .map(|step| step.rule.as_str())
        .filter(|rule| rule.starts_with("fuzzy score"))
        .collect();
    assert!(
        fuzzy_steps
            .iter()
            .any(|rule| rule.contains("first_name exact")),
        "{explanation:?}"
    );
}

#[test]
fn a_known_customer_that_gains_traits_finds_its_anonymous_profile() {
    let mut h = Harness::new();
    // An anonymous visitor fills in a form; later the known customer's own event brings the
    // same traits for the first time.
    h.run_one(
        "anonymous",
        1,
        json!({"cookie_id": "ck-991"}),
        Value::Object(ann()),
    );
    h.run_one(
        "known",
        2,
        json!({"email": "annabel@example.com"}),
        json!({}),
    );
    assert_ne!(h.current_customer("anonymous"), h.current_customer("known"));
    h.run_one(
        "later",
        3,
        json!({"email": "annabel@example.com"}),
        ann_with(json!({"street": "42 Kingsley Rd"})),
    );
    assert_eq!(h.current_customer("anonymous"), h.current_customer("known"));
}

#[test]
fn names_alone_never_link() {
    let mut h = Harness::new();
    h.run_one(
        "one",
        1,
        json!({"email": "one@example.com"}),
        json!({"first_name": "Annabel", "last_name": "Whitfield"}),
    );
    h.run_one(
        "two",
        2,
        json!({}),
        json!({"first_name": "Annabel", "last_name": "Whitfield"}),
    );
    assert_ne!(h.current_customer("one"), h.current_customer("two"));
}
