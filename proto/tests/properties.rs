//! Properties of the wire format and of the merge of results into a node document, over
//! generated inputs (proptest).

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::Value;
use uuid::Uuid;
use vogeler_proto::{
    document::{Node, NodeDocument, Write},
    fresh::FreshDocument,
    names::{NodeName, PluginName},
    version::Scheme,
    wire::{self, Announce, Command, Message, Outcome, PluginInfo, PluginResult, Target},
};

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    (1_600_000_000i64..2_000_000_000, 0u32..1_000_000_000)
        .prop_map(|(s, n)| Utc.timestamp_opt(s, n).single().expect("valid timestamp"))
}

fn node() -> impl Strategy<Value = NodeName> {
    "[a-z0-9][a-z0-9._-]{0,40}".prop_map(|s| NodeName::new(s).expect("node name"))
}

fn plugin() -> impl Strategy<Value = PluginName> {
    "p[a-z0-9_-]{0,20}".prop_map(|s| PluginName::new(s).expect("plugin name"))
}

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<u128>().prop_map(Uuid::from_u128)
}

/// JSON values without floats (a float's text form need not parse back to the same bits,
/// which is serde_json's business, not ours).
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        ".*".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Ok),
        (any::<Option<i32>>(), any::<Option<i32>>(), ".*").prop_map(|(e, s, t)| {
            Outcome::Failed {
                exit_code: e,
                signal: s,
                stderr_tail: t,
            }
        }),
        (".*", ".*").prop_map(|(f, e)| Outcome::InvalidOutput {
            format: f,
            error: e
        }),
        any::<u64>().prop_map(|t| Outcome::TimedOut { timeout_ms: t }),
        ".*".prop_map(|e| Outcome::FailedToStart { error: e }),
        Just(Outcome::UnknownPlugin),
    ]
}

fn result() -> impl Strategy<Value = PluginResult> {
    (
        uuid(),
        node(),
        plugin(),
        outcome(),
        proptest::option::of(json()),
        any::<bool>(),
        time(),
        any::<u64>(),
        ".{0,10}",
    )
        .prop_map(
            |(request_id, node, plugin, outcome, value, truncated, collected_at, d, v)| {
                PluginResult {
                    request_id,
                    node,
                    plugin,
                    outcome,
                    value,
                    truncated,
                    collected_at,
                    duration_ms: d,
                    agent_version: v,
                    scheduled: None,
                }
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    let command = (
        uuid(),
        plugin(),
        prop_oneof![Just(Target::All), node().prop_map(Target::Node)],
        time(),
        proptest::option::of(time()),
    )
        .prop_map(|(request_id, plugin, target, issued_at, expires_at)| {
            Message::Command(Command {
                request_id,
                plugin,
                target,
                issued_at,
                expires_at,
            })
        });
    let announce = (
        node(),
        ".{0,10}",
        prop::collection::vec((plugin(), "[0-9a-f]{0,64}"), 0..5),
        time(),
        time(),
        prop::collection::btree_map("[a-z.]{1,10}", json(), 0..5),
    )
        .prop_map(|(node, v, plugins, started_at, sent_at, facts)| {
            // Every other one says which of its plugins it schedules.
            let schedules = (plugins.len() % 2 == 0).then(|| {
                plugins
                    .iter()
                    .map(|(name, hash)| (name.to_string(), hash.len() as u64 + 1))
                    .collect()
            });
            // Every third one declares its first plugin a package inventory.
            let packages = (plugins.len() % 3 == 0).then(|| {
                plugins
                    .iter()
                    .take(1)
                    .map(|(name, hash)| {
                        let scheme = [Scheme::Dpkg, Scheme::Rpm][hash.len() % 2];
                        (name.to_string(), scheme)
                    })
                    .collect()
            });
            Message::Announce(Announce {
                node,
                agent_version: v,
                plugins: plugins
                    .into_iter()
                    .map(|(name, hash)| PluginInfo { name, hash })
                    .collect(),
                started_at,
                sent_at,
                facts: facts.into_iter().collect(),
                schedules,
                packages,
            })
        });
    prop_oneof![command, result().prop_map(Message::Result), announce]
}

/// Results of one node for a few plugins, with colliding times so that ties are tried.
fn node_results() -> impl Strategy<Value = Vec<PluginResult>> {
    let one = (
        uuid(),
        prop_oneof![Just("pa"), Just("pb")],
        outcome(),
        proptest::option::of(json()),
        0i64..4,
        prop_oneof![Just("1.0"), Just("1.1")],
    )
        .prop_map(|(request_id, plugin, outcome, value, t, v)| PluginResult {
            request_id,
            node: NodeName::new("web01").expect("node"),
            plugin: PluginName::new(plugin).expect("plugin"),
            value: if outcome.is_ok() { value } else { None },
            outcome,
            truncated: false,
            collected_at: Utc
                .timestamp_opt(1_800_000_000 + t, 0)
                .single()
                .expect("time"),
            duration_ms: 1,
            agent_version: v.to_string(),
            scheduled: None,
        });
    // A request id names one result of one node: make them distinct.
    prop::collection::vec(one, 1..10).prop_map(|mut rs| {
        for (i, r) in rs.iter_mut().enumerate() {
            r.request_id = Uuid::from_u128(i as u128 + 1);
        }
        rs
    })
}

fn merged<'a>(results: impl IntoIterator<Item = &'a PluginResult>) -> Value {
    let now = Utc.timestamp_opt(1_900_000_000, 0).single().expect("time");
    let mut node = Node::new(&NodeName::new("web01").expect("node"), now);
    for r in results {
        node.apply_result(r, now);
    }
    serde_json::to_value((&node.doc, &node.fresh)).expect("document json")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(m in message()) {
        let bytes = wire::encode(&m);
        prop_assert_eq!(wire::decode(&bytes).expect("decode"), m);
    }

    #[test]
    fn decoding_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = wire::decode(&bytes);
        let _ = wire::decode_command(&bytes);
    }

    #[test]
    fn any_order_and_duplication_of_results_gives_the_same_document(
        results in node_results(),
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        seed in any::<u64>(),
    ) {
        let once = merged(&results);
        // Every result at least once, in a shuffled order, plus duplicates.
        let mut shuffled: Vec<&PluginResult> = results.iter().collect();
        shuffled.extend(order.iter().map(|i| &results[i.index(results.len())]));
        let mut state = seed;
        for i in (1..shuffled.len()).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (state >> 33) as usize % (i + 1);
            shuffled.swap(i, j);
        }
        prop_assert_eq!(merged(shuffled), once);
    }
}

/// A node's two documents as the database holds them between batches: every message is
/// merged into what was read back, and only what [`Node::into_writes`] says is written.
#[derive(Clone, Default)]
struct Stored {
    doc: Option<NodeDocument>,
    fresh: Option<FreshDocument>,
}

impl Stored {
    fn read(&self, now: DateTime<Utc>) -> Node {
        let name = NodeName::new("web01").expect("node");
        let doc = self
            .doc
            .clone()
            .unwrap_or_else(|| NodeDocument::new(&name, now));
        Node::from_parts(doc, self.fresh.clone())
    }

    fn apply(&mut self, m: &Message, now: DateTime<Utc>) {
        let mut n = self.read(now);
        match m {
            Message::Result(r) => {
                n.apply_result(r, now);
            }
            Message::Announce(a) => {
                n.apply_announce(a, now);
            }
            Message::Command(_) => {}
        }
        for w in n.into_writes() {
            match w {
                Write::Node(d) => self.doc = Some(d),
                Write::Fresh(f) => self.fresh = Some(f),
            }
        }
    }

    /// What readers see: values, facts, schedules, each plugin's merged run, last seen.
    fn view(&self, now: DateTime<Utc>) -> Value {
        let n = self.read(now);
        let plugins: Vec<_> = n
            .doc
            .meta
            .plugins
            .keys()
            .map(|p| {
                let m = n.plugin(p).expect("plugin");
                serde_json::json!([
                    p,
                    m.collected_at,
                    m.outcome,
                    m.hash,
                    m.interval_s,
                    m.next_due
                ])
            })
            .collect();
        serde_json::json!({
            "values": n.doc.values,
            "facts": n.doc.meta.facts,
            "agent_plugins": n.doc.meta.agent_plugins,
            "schedules": n.doc.meta.schedules,
            "packages": n.doc.meta.packages,
            "plugins": plugins,
            "last_seen": n.last_seen(),
            "announced_at": n.announced_at(),
        })
    }
}

/// One node's messages over one plugin whose value stays the same, at distinct times: runs
/// that send it, fail, or confirm it unchanged; announcements with other facts, schedules
/// and package declarations. The first is the earliest full value (an `unchanged` about a value the
/// database never held is dropped by design, so it must arrive after it).
fn node_day() -> impl Strategy<Value = Vec<Message>> {
    let step = prop_oneof![Just(0u8), Just(1), Just(2), Just(3), Just(4)];
    (prop::collection::vec((step, 0u8..2, 0u8..3, 0u8..3), 1..12)).prop_map(|steps| {
        let name = NodeName::new("web01").expect("node");
        let plugin = PluginName::new("hello").expect("plugin");
        let value = serde_json::json!(["a"]);
        let base = Utc.timestamp_opt(1_900_000_000, 0).single().expect("time");
        let at = |i: usize| base + chrono::TimeDelta::seconds(i as i64 * 7);
        let result = |i: usize, outcome: Outcome, value: Option<Value>| {
            Message::Result(PluginResult {
                request_id: Uuid::from_u128(i as u128 + 1),
                node: name.clone(),
                plugin: plugin.clone(),
                outcome,
                value,
                truncated: false,
                collected_at: at(i),
                duration_ms: 1,
                agent_version: "0.1.0".into(),
                scheduled: Some(wire::Schedule { interval_s: 10 }),
            })
        };
        let mut out = vec![result(0, Outcome::Ok, Some(value.clone()))];
        for (k, (kind, facts, schedule, packages)) in steps.into_iter().enumerate() {
            let i = k + 1;
            out.push(match kind {
                0 => result(i, Outcome::Ok, Some(value.clone())),
                1 => result(
                    i,
                    Outcome::Failed {
                        exit_code: Some(1),
                        signal: None,
                        stderr_tail: String::new(),
                    },
                    None,
                ),
                2 | 3 => result(
                    i,
                    Outcome::Unchanged {
                        hash: vogeler_proto::document::value_hash(&value),
                    },
                    None,
                ),
                _ => Message::Announce(Announce {
                    node: name.clone(),
                    agent_version: "0.1.0".into(),
                    plugins: vec![PluginInfo {
                        name: plugin.clone(),
                        hash: "sha256:1".into(),
                    }],
                    started_at: base,
                    sent_at: at(i),
                    facts: serde_json::json!({"kernel": (["6.1", "6.2"][facts as usize])})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    schedules: match schedule {
                        0 => None,
                        1 => Some([("hello".to_string(), 10)].into()),
                        _ => Some(Default::default()),
                    },
                    packages: match packages {
                        0 => None,
                        1 => Some([("hello".to_string(), Scheme::Rpm)].into()),
                        _ => Some(Default::default()),
                    },
                }),
            });
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn any_order_of_a_nodes_messages_gives_the_same_merged_view_of_its_two_documents(
        messages in node_day(),
        extra in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        seed in any::<u64>(),
    ) {
        let now = Utc.timestamp_opt(1_900_001_000, 0).single().expect("time");
        let mut once = Stored::default();
        for m in &messages {
            once.apply(m, now);
        }
        // The first full value first; the rest shuffled, with duplicates.
        let mut rest: Vec<&Message> = messages[1..].iter().collect();
        rest.extend(extra.iter().map(|i| &messages[i.index(messages.len())]));
        let mut state = seed;
        for i in (1..rest.len()).rev() {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (state >> 33) as usize % (i + 1);
            rest.swap(i, j);
        }
        let mut shuffled = Stored::default();
        shuffled.apply(&messages[0], now);
        for m in rest {
            shuffled.apply(m, now);
        }
        prop_assert_eq!(shuffled.view(now), once.view(now));
    }
}

#[test]
fn a_stamp_from_the_future_in_a_node_document_heals_with_the_next_message() {
    let now = Utc.timestamp_opt(1_900_000_100, 0).single().expect("time");
    let at = |s: i64| {
        Utc.timestamp_opt(1_900_000_000 + s, 0)
            .single()
            .expect("time")
    };
    let future: DateTime<Utc> = "2099-01-01T00:00:00Z".parse().expect("time");
    let name = NodeName::new("web01").expect("node");
    let announce = |s: i64, kernel: &str| {
        Message::Announce(Announce {
            node: name.clone(),
            agent_version: "0.1.0".into(),
            plugins: vec![],
            started_at: at(0),
            sent_at: at(s),
            facts: serde_json::json!({ "kernel": kernel })
                .as_object()
                .cloned()
                .unwrap_or_default(),
            schedules: Some(Default::default()),
            packages: Some(Default::default()),
        })
    };
    // Written by hand, or by a release that believed node clocks.
    let mut legacy = NodeDocument::new(&name, at(0));
    legacy.meta.announced_at = Some(future);
    legacy.meta.last_seen = Some(future);
    legacy.meta.facts = serde_json::json!({"kernel": "6.2"})
        .as_object()
        .cloned()
        .unwrap_or_default();
    legacy.meta.schedules = Some(Default::default());
    let mut s = Stored {
        doc: Some(legacy),
        fresh: Some(FreshDocument::new(&name)),
    };
    s.apply(&announce(50, "6.2"), now);
    let n = s.read(now);
    assert_eq!(
        (n.last_seen(), n.announced_at()),
        (Some(at(50)), Some(at(50)))
    );
    // An older announcement, arriving late, no longer replaces newer facts.
    s.apply(&announce(40, "6.1"), now);
    assert_eq!(s.read(now).doc.meta.facts["kernel"], "6.2");
}

#[test]
fn a_future_last_seen_goes_without_moving_last_seen_back() {
    let now = Utc.timestamp_opt(1_900_000_100, 0).single().expect("time");
    let at = |s: i64| {
        Utc.timestamp_opt(1_900_000_000 + s, 0)
            .single()
            .expect("time")
    };
    let future: DateTime<Utc> = "2099-01-01T00:00:00Z".parse().expect("time");
    let name = NodeName::new("web01").expect("node");
    let heartbeat = |s: i64| {
        Message::Announce(Announce {
            node: name.clone(),
            agent_version: "0.1.0".into(),
            plugins: vec![],
            started_at: at(0),
            sent_at: at(s),
            facts: Default::default(),
            schedules: Some(Default::default()),
            packages: Some(Default::default()),
        })
    };
    let mut legacy = NodeDocument::new(&name, at(0));
    legacy.meta.last_seen = Some(future);
    legacy.meta.announced_at = Some(at(1));
    legacy.meta.schedules = Some(Default::default());
    // No freshness document yet: the future stamp is moved, and the node document that
    // still stores it is rewritten by the first message.
    let mut s = Stored {
        doc: Some(legacy.clone()),
        fresh: None,
    };
    s.apply(&heartbeat(10), now);
    assert_eq!(s.doc.as_ref().expect("doc").meta.last_seen, Some(at(10)));
    assert_eq!(s.read(now).last_seen(), Some(at(10)));
    // A valid stamp in the freshness document, a future one in the node document: a late,
    // older message clears the future one but does not move last seen back.
    let mut fresh = FreshDocument::new(&name);
    fresh.fresh.last_seen = Some(at(10));
    let mut s = Stored {
        doc: Some(legacy),
        fresh: Some(fresh),
    };
    s.apply(&heartbeat(5), now);
    assert_eq!(s.read(now).last_seen(), Some(at(10)));
    assert_eq!(s.doc.as_ref().expect("doc").meta.last_seen, Some(at(10)));
}
