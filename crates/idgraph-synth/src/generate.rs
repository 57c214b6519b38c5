//! The synthetic touchpoint generator.

use std::io::{self, Write};

use chrono::{DateTime, Datelike, Duration, NaiveDate, SecondsFormat, TimeZone, Utc};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::noise::{corrupt_identifier, corrupt_traits, Noise};
use crate::people::{
    AREA_CODES, CITIES, EMAIL_DOMAINS, FIRST_NAMES, JUNK_IDENTIFIERS, LAST_NAMES, NICKNAMES,
    STREET_NAMES, STREET_TYPES,
};

/// What to generate. Every share is a probability per event.
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    /// Touchpoint events to write (malformed lines included; link events at the end excluded).
    pub events: usize,
    pub seed: u64,
    /// Average events per customer; sets the population size.
    pub events_per_customer: f64,
    /// Lines replaced by malformed input (bad JSON, bad UTF-8, missing or wrong fields).
    pub malformed_share: f64,
    /// Events that carry one junk identifier value besides their real ones.
    pub junk_share: f64,
    /// Web and mobile events written in Segment Spec instead of the canonical envelope.
    pub segment_share: f64,
    /// Names written with a one-letter typo.
    pub typo_share: f64,
    /// The corruption mix on top of the above (see [`Noise`]).
    pub noise: Noise,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            events: 10_000,
            seed: 1,
            events_per_customer: 8.0,
            malformed_share: 0.005,
            junk_share: 0.02,
            segment_share: 0.3,
            typo_share: 0.05,
            noise: Noise::Normal,
        }
    }
}

/// One line of the truth file: the customer an event really belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruthRecord {
    pub event_id: String,
    pub customer: String,
}

/// What a generation run wrote.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenSummary {
    pub lines: u64,
    pub events: u64,
    pub malformed: u64,
    pub customers: u64,
    pub segment_messages: u64,
    pub junk_values: u64,
    pub shared_device_events: u64,
    pub call_centre_events: u64,
    /// Closing login events that tie each customer's otherwise separate identifiers together,
    /// so the truth is reachable from the data.
    pub link_events: u64,
}

struct Address {
    number: u32,
    street: &'static str,
    street_type: usize,
    city: usize,
    postcode: String,
}

/// One made-up person and the identifiers they use. `ids[0]` is their primary email.
struct Customer {
    key: String,
    first: &'static str,
    nickname: Option<&'static str>,
    last: &'static str,
    dob: NaiveDate,
    addresses: Vec<Address>,
    /// Events after this index show the second address.
    moves_at: usize,
    ids: Vec<(&'static str, String)>,
    /// A tiny union-find over `ids`: which of them the events so far have tied together.
    parent: Vec<usize>,
    used: Vec<bool>,
}

impl Customer {
    fn of_kind(&self, kind: &str) -> Vec<usize> {
        (0..self.ids.len())
            .filter(|i| self.ids[*i].0 == kind)
            .collect()
    }

    fn root(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    /// For each group of used identifiers that no event has tied to the primary email, its
    /// strongest identifier: what a customer logs in with.
    fn unlinked_components(&mut self) -> Vec<usize> {
        const STRENGTH: [&str; 7] = [
            "user_id",
            "loyalty_id",
            "email",
            "phone",
            "social_handle",
            "device_id",
            "cookie_id",
        ];
        let primary = self.root(0);
        let mut best: Vec<(usize, usize, usize)> = Vec::new();
        for i in 0..self.ids.len() {
            let root = self.root(i);
            if !self.used[i] || root == primary {
                continue;
            }
            let strength = STRENGTH
                .iter()
                .position(|k| *k == self.ids[i].0)
                .unwrap_or(STRENGTH.len());
            match best.iter_mut().find(|(r, _, _)| *r == root) {
                Some(entry) if strength < entry.1 => *entry = (root, strength, i),
                Some(_) => {}
                None => best.push((root, strength, i)),
            }
        }
        best.into_iter().map(|(_, _, i)| i).collect()
    }

    fn tie(&mut self, indices: &[usize]) {
        for &i in indices {
            self.used[i] = true;
        }
        if let Some((&first, rest)) = indices.split_first() {
            for &other in rest {
                let (a, b) = (self.root(first), self.root(other));
                self.parent[b] = a;
            }
        }
    }
}

/// A call-centre number and in-store tablets: values many customers' events carry.
const CALL_CENTRE_PHONE: &str = "+1 212 639 0100";
const STORE_TABLETS: [&str; 3] = ["tablet-store-001", "tablet-store-002", "tablet-store-003"];

/// One event being assembled before it is written in one format or the other.
struct Draft {
    event_id: String,
    source: &'static str,
    event_type: &'static str,
    timestamp: String,
    identifiers: Vec<(String, String)>,
    traits: Map<String, Value>,
    properties: Map<String, Value>,
}

/// Writes `config.events` lines of touchpoints to `events` and one [`TruthRecord`] per valid
/// event to `truth`, both as JSON Lines. The same config always writes the same bytes.
pub fn generate(
    config: &GenConfig,
    events: &mut impl Write,
    truth: &mut impl Write,
) -> io::Result<GenSummary> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let population =
        ((config.events as f64 / config.events_per_customer.max(1.0)).ceil() as usize).max(1);
    let mut customers: Vec<Customer> = (0..population)
        .map(|index| new_customer(&mut rng, index, config.events))
        .collect();
    let mut summary = GenSummary {
        customers: population as u64,
        ..GenSummary::default()
    };
    let start = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("valid start time");
    for index in 0..config.events {
        // A skewed pick: a few customers are very active, most are not.
        let u: f64 = rng.gen();
        let who = ((u.powf(1.6) * population as f64) as usize).min(population - 1);
        let time = start + Duration::seconds(index as i64 * 30 + rng.gen_range(0..30));
        let customer = &mut customers[who];
        let (draft, used) = draft_event(&mut rng, config, customer, index, time, &mut summary);
        customer.tie(&used);
        let mut line = render(&mut rng, config, &draft, &mut summary);
        if rng.gen_bool(config.malformed_share) {
            line = malform(&mut rng, line, index);
            summary.malformed += 1;
        } else {
            write_truth(truth, &draft.event_id, &customer.key)?;
            summary.events += 1;
        }
        events.write_all(&line)?;
        events.write_all(b"\n")?;
        summary.lines += 1;
    }
    let end = start + Duration::seconds(config.events as i64 * 30 + 60);
    for customer in &mut customers {
        for i in customer.unlinked_components() {
            let draft = Draft {
                event_id: format!("link-{:07}", summary.link_events),
                source: "web",
                event_type: "login",
                timestamp: end.to_rfc3339_opts(SecondsFormat::Secs, true),
                identifiers: vec![
                    (customer.ids[0].0.to_owned(), customer.ids[0].1.clone()),
                    (customer.ids[i].0.to_owned(), customer.ids[i].1.clone()),
                ],
                traits: Map::new(),
                properties: Map::new(),
            };
            customer.tie(&[0, i]);
            events.write_all(&canonical(&draft))?;
            events.write_all(b"\n")?;
            write_truth(truth, &draft.event_id, &customer.key)?;
            summary.link_events += 1;
            summary.events += 1;
            summary.lines += 1;
        }
    }
    Ok(summary)
}

fn write_truth(truth: &mut impl Write, event_id: &str, customer: &str) -> io::Result<()> {
    let record = TruthRecord {
        event_id: event_id.to_owned(),
        customer: customer.to_owned(),
    };
    serde_json::to_writer(&mut *truth, &record)?;
    truth.write_all(b"\n")
}

fn new_customer(rng: &mut ChaCha8Rng, index: usize, total_events: usize) -> Customer {
    let first = *FIRST_NAMES.choose(rng).expect("names");
    let last = *LAST_NAMES.choose(rng).expect("names");
    let nickname = NICKNAMES
        .iter()
        .find(|(formal, _)| *formal == first)
        .map(|(_, nick)| *nick);
    let dob = NaiveDate::from_ymd_opt(1940, 1, 1).expect("valid date")
        + Duration::days(rng.gen_range(0..365 * 65));
    let address_count = if rng.gen_bool(0.15) { 2 } else { 1 };
    let addresses = (0..address_count).map(|_| new_address(rng)).collect();
    let slug = format!("{}.{}", ascii_slug(first), ascii_slug(last));
    let mut ids: Vec<(&'static str, String)> = Vec::new();
    let email_count = 1 + usize::from(rng.gen_bool(0.3)) + usize::from(rng.gen_bool(0.1));
    for n in 0..email_count {
        let domain = EMAIL_DOMAINS.choose(rng).expect("domains");
        ids.push((
            "email",
            format!("{slug}{index}{}@{domain}", ["", ".alt", ".work"][n]),
        ));
    }
    let phone_count = [0, 1, 1, 1, 2].choose(rng).copied().unwrap_or(1);
    for _ in 0..phone_count {
        let area = AREA_CODES.choose(rng).expect("area codes");
        ids.push((
            "phone",
            format!(
                "{area}{}{:04}",
                rng.gen_range(201..999),
                rng.gen_range(0..10_000)
            ),
        ));
    }
    for _ in 0..rng.gen_range(1..=2) {
        ids.push(("device_id", format!("dev-{:016x}", rng.gen::<u64>())));
    }
    for _ in 0..rng.gen_range(1..=3) {
        ids.push(("cookie_id", format!("ck-{:016x}", rng.gen::<u64>())));
    }
    if rng.gen_bool(0.75) {
        ids.push(("user_id", format!("u-{index}")));
    }
    if rng.gen_bool(0.4) {
        ids.push(("loyalty_id", format!("L{index:08}")));
    }
    if rng.gen_bool(0.35) {
        ids.push(("social_handle", format!("@{}{index}", ascii_slug(first))));
    }
    let count = ids.len();
    Customer {
        key: format!("p{index:07}"),
        first,
        nickname,
        last,
        dob,
        addresses,
        moves_at: rng.gen_range(0..total_events.max(1)),
        ids,
        parent: (0..count).collect(),
        used: vec![false; count],
    }
}

fn new_address(rng: &mut ChaCha8Rng) -> Address {
    let city = rng.gen_range(0..CITIES.len());
    // US postcodes have a three-digit prefix, Australian ones two: both get two more digits.
    let prefix = CITIES[city].2;
    Address {
        number: rng.gen_range(1..400),
        street: STREET_NAMES.choose(rng).expect("streets"),
        street_type: rng.gen_range(0..STREET_TYPES.len()),
        city,
        postcode: format!("{prefix}{:02}", rng.gen_range(0..100)),
    }
}

/// Lower-case ASCII for building email addresses and handles from names.
fn ascii_slug(name: &str) -> String {
    name.chars()
        .filter_map(|c| match c {
            'é' | 'ë' | 'è' => Some('e'),
            'ñ' => Some('n'),
            'ü' => Some('u'),
            c if c.is_ascii_alphanumeric() => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Builds the event: which identifiers the customer shows on this source, and the traits and
/// properties the source carries. Returns the indices of the customer's identifiers used.
fn draft_event(
    rng: &mut ChaCha8Rng,
    config: &GenConfig,
    customer: &Customer,
    index: usize,
    time: DateTime<Utc>,
    summary: &mut GenSummary,
) -> (Draft, Vec<usize>) {
    let source = *[
        "web",
        "web",
        "web",
        "web",
        "web",
        "web",
        "mobile",
        "mobile",
        "mobile",
        "mobile",
        "transaction",
        "transaction",
        "transaction",
        "transaction",
        "transaction",
        "community",
        "community",
        "community",
        "listening",
        "listening",
    ]
    .choose(rng)
    .expect("sources");
    let mut used: Vec<usize> = Vec::new();
    let mut extra: Vec<(String, String)> = Vec::new();
    let mut traits = Map::new();
    let mut properties = Map::new();
    let pick = |rng: &mut ChaCha8Rng, kind: &str| customer.of_kind(kind).choose(rng).copied();
    let strong = |rng: &mut ChaCha8Rng| {
        pick(rng, "user_id")
            .or_else(|| pick(rng, "email"))
            .expect("every customer has an email")
    };
    let event_type = match source {
        "web" => {
            used.extend(pick(rng, "cookie_id"));
            if rng.gen_bool(0.5) {
                used.push(strong(rng));
            }
            *["page_view", "product_view", "add_to_cart", "search"]
                .choose(rng)
                .expect("types")
        }
        "mobile" => {
            used.extend(pick(rng, "device_id"));
            if rng.gen_bool(0.7) {
                used.push(strong(rng));
            }
            *["app_open", "screen_view", "add_to_cart"]
                .choose(rng)
                .expect("types")
        }
        "transaction" => {
            if rng.gen_bool(0.8) {
                used.extend(pick(rng, "email"));
            }
            let call_centre = rng.gen_bool(0.03);
            if call_centre {
                extra.push(("phone".into(), CALL_CENTRE_PHONE.into()));
                summary.call_centre_events += 1;
            } else if rng.gen_bool(0.5) {
                used.extend(pick(rng, "phone"));
            }
            if rng.gen_bool(0.7) {
                used.extend(pick(rng, "loyalty_id"));
            }
            if used.is_empty() {
                used.extend(pick(rng, "email"));
            }
            if rng.gen_bool(0.05) {
                extra.push((
                    "device_id".into(),
                    (*STORE_TABLETS.choose(rng).expect("tablets")).into(),
                ));
                summary.shared_device_events += 1;
            }
            person_traits(rng, config, customer, index, true, &mut traits);
            let cents: i64 = rng.gen_range(500..50_000);
            properties.insert("amount".into(), json!(cents as f64 / 100.0));
            properties.insert(
                "currency".into(),
                json!(if rng.gen_bool(0.8) { "USD" } else { "AUD" }),
            );
            "order_completed"
        }
        "community" => {
            used.extend(pick(rng, "social_handle"));
            if used.is_empty() || rng.gen_bool(0.6) {
                used.extend(pick(rng, "email"));
            }
            person_traits(rng, config, customer, index, false, &mut traits);
            properties.insert("followers".into(), json!(rng.gen_range(0..5000)));
            *["post", "comment", "review"].choose(rng).expect("types")
        }
        _ => {
            used.extend(pick(rng, "social_handle").or_else(|| pick(rng, "email")));
            if rng.gen_bool(0.3) {
                person_traits(rng, config, customer, index, false, &mut traits);
            }
            properties.insert("followers".into(), json!(rng.gen_range(0..100_000)));
            properties.insert(
                "sentiment".into(),
                json!((rng.gen_range(-100..=100) as f64) / 100.0),
            );
            "mention"
        }
    };
    used.sort_unstable();
    used.dedup();
    // Hand-typed identifiers carry typos only on events whose full traits can still place
    // them, so the truth stays reachable from the data.
    let typed_by_hand = source == "transaction";
    let mut mistyped: Vec<usize> = Vec::new();
    let mut identifiers: Vec<(String, String)> = used
        .iter()
        .map(|i| {
            let (kind, value) = &customer.ids[*i];
            let mut written = styled_identifier(rng, kind, value);
            if typed_by_hand {
                let spoiled = corrupt_identifier(rng, config.noise, kind, &written);
                if spoiled != written {
                    mistyped.push(*i);
                    written = spoiled;
                }
            }
            ((*kind).to_owned(), written)
        })
        .collect();
    // A mistyped value is another value: it ties nothing of the customer's together.
    used.retain(|i| !mistyped.contains(i));
    identifiers.extend(extra);
    if rng.gen_bool(config.junk_share) {
        let (kind, value) = JUNK_IDENTIFIERS.choose(rng).expect("junk");
        identifiers.push(((*kind).to_owned(), (*value).to_owned()));
        summary.junk_values += 1;
    }
    let draft = Draft {
        event_id: format!("{source}-{index:08}"),
        source,
        event_type,
        timestamp: time.to_rfc3339_opts(SecondsFormat::Secs, true),
        identifiers,
        traits,
        properties,
    };
    (draft, used)
}

/// Writes an identifier the way different systems do: mixed case, gmail dots and tags,
/// phone numbers in several layouts.
fn styled_identifier(rng: &mut ChaCha8Rng, kind: &str, value: &str) -> String {
    match kind {
        "email" => {
            let (local, domain) = value.split_once('@').expect("generated emails have an @");
            match rng.gen_range(0..10) {
                0 => value.to_uppercase(),
                1 if domain == "gmail.com" => format!("{}+shop@{domain}", local.replace('.', "")),
                2 => format!(" {value} "),
                _ => value.to_owned(),
            }
        }
        "phone" => {
            let (area, rest) = value.split_at(3);
            let (exchange, line) = rest.split_at(3);
            match rng.gen_range(0..4) {
                0 => format!("+1 {area} {exchange} {line}"),
                1 => format!("({area}) {exchange}-{line}"),
                2 => format!("{area}.{exchange}.{line}"),
                _ => format!("1{area}{exchange}{line}"),
            }
        }
        "social_handle" if rng.gen_bool(0.3) => value.to_uppercase(),
        _ => value.to_owned(),
    }
}

/// Adds name (and with `full`, birth date and address) traits, with the variation real
/// sources show: nicknames, typos, case, date formats, street-type spellings, a move.
fn person_traits(
    rng: &mut ChaCha8Rng,
    config: &GenConfig,
    customer: &Customer,
    index: usize,
    full: bool,
    traits: &mut Map<String, Value>,
) {
    let mut first = match customer.nickname {
        Some(nick) if rng.gen_bool(0.25) => nick.to_owned(),
        _ => customer.first.to_owned(),
    };
    let mut last = customer.last.to_owned();
    if rng.gen_bool(config.typo_share) {
        if rng.gen_bool(0.5) {
            first = typo(rng, &first);
        } else {
            last = typo(rng, &last);
        }
    }
    if rng.gen_bool(0.1) {
        last = last.to_uppercase();
    }
    traits.insert("first_name".into(), json!(first));
    traits.insert("last_name".into(), json!(last));
    if !full {
        corrupt_traits(rng, config.noise, traits);
        return;
    }
    let dob = customer.dob;
    let dob_text = match rng.gen_range(0..4) {
        0 => format!("{:02}/{:02}/{}", dob.day(), dob.month(), dob.year()),
        1 => dob.format("%b %d, %Y").to_string(),
        _ => dob.format("%Y-%m-%d").to_string(),
    };
    traits.insert("date_of_birth".into(), json!(dob_text));
    let address = if index > customer.moves_at && customer.addresses.len() > 1 {
        &customer.addresses[1]
    } else {
        &customer.addresses[0]
    };
    let (long, short) = STREET_TYPES[address.street_type];
    let street_type = if rng.gen_bool(0.5) { long } else { short };
    let (city, state, _, country) = CITIES[address.city];
    traits.insert(
        "street".into(),
        json!(format!(
            "{} {} {street_type}",
            address.number, address.street
        )),
    );
    traits.insert("city".into(), json!(city));
    traits.insert("state".into(), json!(state));
    traits.insert("postcode".into(), json!(address.postcode));
    traits.insert("country".into(), json!(country));
    corrupt_traits(rng, config.noise, traits);
}

/// One typing slip: a letter replaced, dropped, or swapped with its neighbour.
fn typo(rng: &mut ChaCha8Rng, word: &str) -> String {
    let mut chars: Vec<char> = word.chars().collect();
    if chars.len() < 4 {
        return word.to_owned();
    }
    let at = rng.gen_range(1..chars.len() - 1);
    match rng.gen_range(0..3) {
        0 => chars[at] = (b'a' + rng.gen_range(0..26)) as char,
        1 => {
            chars.remove(at);
        }
        _ => chars.swap(at, at + 1),
    }
    chars.into_iter().collect()
}

/// Writes the draft in the canonical envelope, or for some web and mobile events in Segment
/// Spec.
fn render(
    rng: &mut ChaCha8Rng,
    config: &GenConfig,
    draft: &Draft,
    summary: &mut GenSummary,
) -> Vec<u8> {
    let segment_capable = matches!(draft.source, "web" | "mobile");
    if segment_capable && rng.gen_bool(config.segment_share) {
        summary.segment_messages += 1;
        return segment(rng, draft);
    }
    canonical(draft)
}

fn canonical(draft: &Draft) -> Vec<u8> {
    let mut identifiers = Map::new();
    for (kind, value) in &draft.identifiers {
        match identifiers.get_mut(kind) {
            Some(Value::Array(values)) => values.push(json!(value)),
            Some(single) => *single = json!([single.clone(), value]),
            None => {
                identifiers.insert(kind.clone(), json!(value));
            }
        }
    }
    let mut object = json!({
        "event_id": draft.event_id,
        "source": draft.source,
        "event_type": draft.event_type,
        "timestamp": draft.timestamp,
        "identifiers": identifiers,
    });
    if !draft.traits.is_empty() {
        object["traits"] = Value::Object(draft.traits.clone());
    }
    if !draft.properties.is_empty() {
        object["properties"] = Value::Object(draft.properties.clone());
    }
    serde_json::to_vec(&object).expect("json values serialize")
}

/// Segment Spec: `userId`, `anonymousId` (the cookie), `context.device.id`, email in
/// `context.traits`; a logged-in web event is sometimes an `alias` of the cookie.
fn segment(rng: &mut ChaCha8Rng, draft: &Draft) -> Vec<u8> {
    let find = |kind: &str| {
        draft
            .identifiers
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, v)| v.clone())
    };
    let user_id = find("user_id");
    let cookie = find("cookie_id");
    let email = find("email");
    let mut object = Map::new();
    let message_type = match (draft.source, &user_id, &cookie) {
        ("web", Some(_), Some(_)) if rng.gen_bool(0.2) => "alias",
        ("web", _, _) if draft.event_type == "page_view" => "page",
        ("mobile", _, _) if draft.event_type == "screen_view" => "screen",
        (_, _, _) if email.is_some() && rng.gen_bool(0.3) => "identify",
        _ => "track",
    };
    object.insert("type".into(), json!(message_type));
    object.insert("messageId".into(), json!(draft.event_id));
    object.insert("timestamp".into(), json!(draft.timestamp));
    object.insert("source".into(), json!(draft.source));
    if message_type == "track" {
        object.insert("event".into(), json!(draft.event_type));
    }
    if let Some(user_id) = user_id {
        object.insert("userId".into(), json!(user_id));
    }
    match (message_type, cookie) {
        ("alias", Some(cookie)) => {
            object.insert("previousId".into(), json!(cookie));
        }
        (_, Some(cookie)) => {
            object.insert("anonymousId".into(), json!(cookie));
        }
        _ => {}
    }
    let mut context = Map::new();
    if let Some(device) = find("device_id") {
        context.insert("device".into(), json!({ "id": device }));
    }
    let mut traits = Map::new();
    if let Some(email) = email {
        traits.insert("email".into(), json!(email));
    }
    for (kind, value) in &draft.identifiers {
        // Junk values and other kinds Segment has no slot for travel as traits of their own.
        if !matches!(
            kind.as_str(),
            "user_id" | "cookie_id" | "device_id" | "email"
        ) {
            traits.insert(kind.clone(), json!(value));
        }
    }
    if !traits.is_empty() {
        context.insert("traits".into(), Value::Object(traits));
    }
    if !context.is_empty() {
        object.insert("context".into(), Value::Object(context));
    }
    if !draft.properties.is_empty() {
        object.insert("properties".into(), Value::Object(draft.properties.clone()));
    }
    serde_json::to_vec(&Value::Object(object)).expect("json values serialize")
}

/// Spoils a line the way broken producers do; the kind rotates with the line number.
fn malform(rng: &mut ChaCha8Rng, mut line: Vec<u8>, index: usize) -> Vec<u8> {
    match index % 6 {
        0 => {
            line.truncate(line.len() / 2);
            line
        }
        1 => {
            let at = rng.gen_range(1..line.len());
            line.insert(at, 0xff);
            line
        }
        2 => String::from_utf8_lossy(&line).replacen("\"event_id\"", "\"eventid\"", 1).replacen("\"messageId\"", "\"message\"", 1).into_bytes(),
        3 => br#"{"event_id":"broken-"#.iter().chain(index.to_string().as_bytes()).chain(br#"","source":"web","event_type":"x","timestamp":"2026-01-01T00:00:00Z","identifiers":42}"#).copied().collect(),
        4 => String::from_utf8_lossy(&line).replacen("Z\"", "later\"", 1).into_bytes(),
        _ => b"[\"not\", \"an\", \"object\"]".to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: &GenConfig) -> (Vec<u8>, Vec<u8>, GenSummary) {
        let (mut events, mut truth) = (Vec::new(), Vec::new());
        let summary = generate(config, &mut events, &mut truth).unwrap();
        (events, truth, summary)
    }

    #[test]
    fn the_same_seed_writes_the_same_bytes_and_another_seed_does_not() {
        let config = GenConfig {
            events: 2000,
            ..GenConfig::default()
        };
        let (a, ta, _) = run(&config);
        let (b, tb, _) = run(&config);
        assert_eq!(a, b);
        assert_eq!(ta, tb);
        let (c, _, _) = run(&GenConfig { seed: 2, ..config });
        assert_ne!(a, c);
    }

    #[test]
    fn every_valid_event_has_truth_and_malformed_lines_have_none() {
        let config = GenConfig {
            events: 5000,
            ..GenConfig::default()
        };
        let (events, truth, summary) = run(&config);
        let lines = events
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64;
        let truths = truth
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64;
        assert_eq!(lines, summary.lines);
        assert_eq!(truths, summary.events);
        assert_eq!(summary.lines, summary.events + summary.malformed);
        assert!(summary.malformed > 0 && summary.segment_messages > 0 && summary.junk_values > 0);
        assert!(summary.call_centre_events > 0 && summary.shared_device_events > 0);
    }
}
