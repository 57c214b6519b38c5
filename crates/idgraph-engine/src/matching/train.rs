//! Estimating m and u from unlabelled records, as Splink does: u from random pairs (nearly all
//! of which are two different people), then m by expectation maximisation over the blocked
//! candidate pairs, each pair's match probability computed from the current m and u. Pure:
//! the caller reads the records, picks the pairs and writes the result.

use super::comparison::ComparisonKind;

/// Counts of the level each compared field reached, over a set of pairs.
#[derive(Debug, Clone)]
pub struct LevelCounts {
    /// Per field, per level.
    counts: Vec<Vec<f64>>,
}

impl LevelCounts {
    fn new(kinds: &[ComparisonKind]) -> Self {
        LevelCounts {
            counts: kinds.iter().map(|k| vec![0.0; k.levels().len()]).collect(),
        }
    }

    fn add(&mut self, vector: &[Option<u8>], weight: f64) {
        for (field, level) in vector.iter().enumerate() {
            if let Some(level) = level {
                self.counts[field][*level as usize] += weight;
            }
        }
    }

    /// The counts as probabilities per field, every level at least `floor` so that no weight
    /// becomes infinite (a level never seen in the sample is rare, not impossible).
    fn probabilities(&self, floor: f64) -> Vec<Vec<f64>> {
        self.counts
            .iter()
            .map(|levels| {
                let total: f64 = levels.iter().sum();
                let raw: Vec<f64> = levels
                    .iter()
                    .map(|c| {
                        if total > 0.0 {
                            (c / total).max(floor)
                        } else {
                            floor
                        }
                    })
                    .collect();
                let sum: f64 = raw.iter().sum();
                raw.iter().map(|p| p / sum).collect()
            })
            .collect()
    }
}

/// What training found: per field and level, m and u, and the share of candidate pairs that
/// are matches.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained {
    pub m: Vec<Vec<f64>>,
    pub u: Vec<Vec<f64>>,
    pub match_share: f64,
    pub iterations: usize,
}

/// The smallest probability a level is given.
const FLOOR: f64 = 1e-5;

/// Estimates u from `random_pairs`' comparison vectors, then m by EM over `candidate_pairs`,
/// starting from `prior_m`, until m moves less than 1e-4 or after `max_iterations`.
pub fn train(
    kinds: &[ComparisonKind],
    prior_m: &[Vec<f64>],
    random_pairs: &[Vec<Option<u8>>],
    candidate_pairs: &[Vec<Option<u8>>],
    max_iterations: usize,
) -> Trained {
    let mut u_counts = LevelCounts::new(kinds);
    for vector in random_pairs {
        u_counts.add(vector, 1.0);
    }
    let u = u_counts.probabilities(FLOOR);
    let mut m = prior_m.to_vec();
    let mut match_share = 0.1;
    let mut iterations = 0;
    while iterations < max_iterations {
        iterations += 1;
        let mut m_counts = LevelCounts::new(kinds);
        let mut matches = 0.0;
        for vector in candidate_pairs {
            let p = match_probability(&m, &u, match_share, vector);
            m_counts.add(vector, p);
            matches += p;
        }
        let next = m_counts.probabilities(FLOOR);
        let moved = next
            .iter()
            .flatten()
            .zip(m.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        m = next;
        match_share = (matches / candidate_pairs.len().max(1) as f64).clamp(1e-6, 1.0 - 1e-6);
        if moved < 1e-4 {
            break;
        }
    }
    Trained {
        m,
        u,
        match_share,
        iterations,
    }
}

/// P(match | comparison vector) under the current parameters (E step).
fn match_probability(m: &[Vec<f64>], u: &[Vec<f64>], share: f64, vector: &[Option<u8>]) -> f64 {
    let mut log_odds = (share / (1.0 - share)).ln();
    for (field, level) in vector.iter().enumerate() {
        if let Some(level) = level {
            let level = *level as usize;
            log_odds += (m[field][level] / u[field][level]).ln();
        }
    }
    1.0 / (1.0 + (-log_odds).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn em_finds_the_levels_that_matches_reach() {
        // One field with code levels (exact, one_edit, else). Random pairs almost never agree;
        // among candidates, 30% are matches that agree exactly or by one edit.
        let kinds = [ComparisonKind::Code];
        let random: Vec<Vec<Option<u8>>> = (0..1000)
            .map(|i| vec![Some(if i == 0 { 0 } else { 2 })])
            .collect();
        let mut candidates = Vec::new();
        for i in 0..1000 {
            let level = match i % 10 {
                0 | 1 => 0,
                2 => 1,
                _ => 2,
            };
            candidates.push(vec![Some(level)]);
        }
        let prior = vec![vec![0.5, 0.25, 0.25]];
        let trained = train(&kinds, &prior, &random, &candidates, 50);
        assert!((trained.match_share - 0.3).abs() < 0.05, "{trained:?}");
        assert!(
            trained.m[0][0] > 0.5 && trained.m[0][2] < 0.1,
            "{trained:?}"
        );
        assert!(trained.u[0][2] > 0.99, "{trained:?}");
    }
}
