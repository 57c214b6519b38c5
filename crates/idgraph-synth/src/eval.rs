//! Clustering accuracy: pairwise and B-cubed precision and recall against ground truth.

use std::collections::HashMap;

use serde::Serialize;

/// How well a resolution's clusters match the true customers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Accuracy {
    /// Events present in both the truth and the resolution; the figures are over these.
    pub events_scored: u64,
    /// Truth events with no resolution (they were lost, or dead-lettered by mistake).
    pub missing_from_resolution: u64,
    /// Resolved events the truth does not know.
    pub unknown_to_truth: u64,
    pub pairwise_precision: f64,
    pub pairwise_recall: f64,
    pub pairwise_f1: f64,
    pub bcubed_precision: f64,
    pub bcubed_recall: f64,
    pub bcubed_f1: f64,
    pub true_clusters: u64,
    pub predicted_clusters: u64,
    pub largest_true_cluster: u64,
    pub largest_predicted_cluster: u64,
}

fn pairs(n: u64) -> u128 {
    let n = n as u128;
    n * n.saturating_sub(1) / 2
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        1.0
    } else {
        numerator / denominator
    }
}

fn f1(precision: f64, recall: f64) -> f64 {
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

/// Compares `resolved` (event id → customer id, first assignment of each event wins) with
/// `truth` (event id → true customer).
pub fn evaluate<'a>(
    truth: &HashMap<String, String>,
    resolved: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Accuracy {
    let mut assigned: HashMap<&str, &str> = HashMap::new();
    let mut unknown_to_truth = 0u64;
    for (event_id, customer_id) in resolved {
        if !truth.contains_key(event_id) {
            unknown_to_truth += 1;
            continue;
        }
        assigned.entry(event_id).or_insert(customer_id);
    }
    let mut cells: HashMap<(&str, &str), u64> = HashMap::new();
    let mut predicted_sizes: HashMap<&str, u64> = HashMap::new();
    let mut true_sizes: HashMap<&str, u64> = HashMap::new();
    for (event_id, predicted) in &assigned {
        let actual = truth[*event_id].as_str();
        *cells.entry((predicted, actual)).or_default() += 1;
        *predicted_sizes.entry(predicted).or_default() += 1;
        *true_sizes.entry(actual).or_default() += 1;
    }
    let events_scored = assigned.len() as u64;
    let true_positive_pairs: u128 = cells.values().map(|n| pairs(*n)).sum();
    let predicted_pairs: u128 = predicted_sizes.values().map(|n| pairs(*n)).sum();
    let true_pairs: u128 = true_sizes.values().map(|n| pairs(*n)).sum();
    let pairwise_precision = ratio(true_positive_pairs as f64, predicted_pairs as f64);
    let pairwise_recall = ratio(true_positive_pairs as f64, true_pairs as f64);
    // B-cubed: each event's precision is the share of its predicted cluster that truly
    // belongs with it; summed per (predicted, true) cell that is n * n / size.
    let mut bcubed_precision = 0.0;
    let mut bcubed_recall = 0.0;
    for ((predicted, actual), n) in &cells {
        let n = *n as f64;
        bcubed_precision += n * n / predicted_sizes[predicted] as f64;
        bcubed_recall += n * n / true_sizes[actual] as f64;
    }
    let bcubed_precision = ratio(bcubed_precision, events_scored as f64);
    let bcubed_recall = ratio(bcubed_recall, events_scored as f64);
    Accuracy {
        events_scored,
        missing_from_resolution: truth.len() as u64 - events_scored,
        unknown_to_truth,
        pairwise_precision,
        pairwise_recall,
        pairwise_f1: f1(pairwise_precision, pairwise_recall),
        bcubed_precision,
        bcubed_recall,
        bcubed_f1: f1(bcubed_precision, bcubed_recall),
        true_clusters: true_sizes.len() as u64,
        predicted_clusters: predicted_sizes.len() as u64,
        largest_true_cluster: true_sizes.values().copied().max().unwrap_or(0),
        largest_predicted_cluster: predicted_sizes.values().copied().max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(e, c)| (e.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn a_perfect_resolution_scores_one_everywhere() {
        let t = truth(&[("e1", "a"), ("e2", "a"), ("e3", "b")]);
        let acc = evaluate(&t, [("e1", "x"), ("e2", "x"), ("e3", "y")]);
        assert_eq!(acc.pairwise_precision, 1.0);
        assert_eq!(acc.pairwise_recall, 1.0);
        assert_eq!(acc.bcubed_f1, 1.0);
        assert_eq!(acc.predicted_clusters, 2);
    }

    #[test]
    fn a_false_merge_costs_precision_and_a_split_costs_recall() {
        let t = truth(&[("e1", "a"), ("e2", "a"), ("e3", "b"), ("e4", "b")]);
        let merged = evaluate(&t, [("e1", "x"), ("e2", "x"), ("e3", "x"), ("e4", "x")]);
        assert_eq!(merged.pairwise_recall, 1.0);
        assert!((merged.pairwise_precision - 2.0 / 6.0).abs() < 1e-9);
        assert!((merged.bcubed_precision - 0.5).abs() < 1e-9);
        let split = evaluate(&t, [("e1", "x"), ("e2", "y"), ("e3", "z"), ("e4", "z")]);
        assert_eq!(split.pairwise_precision, 1.0);
        assert!((split.pairwise_recall - 0.5).abs() < 1e-9);
        assert_eq!(split.largest_predicted_cluster, 2);
    }

    #[test]
    fn missing_and_unknown_events_are_counted_not_scored() {
        let t = truth(&[("e1", "a"), ("e2", "a")]);
        let acc = evaluate(&t, [("e1", "x"), ("zz", "x")]);
        assert_eq!(acc.events_scored, 1);
        assert_eq!(acc.missing_from_resolution, 1);
        assert_eq!(acc.unknown_to_truth, 1);
    }
}
