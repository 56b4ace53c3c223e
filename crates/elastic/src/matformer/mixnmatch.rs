//! Mix'n'Match under a parameter budget.
//!
//! The rule (after the MatFormer paper's observation that submodels whose
//! granularity changes slowly and does not decrease with depth land on the
//! trained models' accuracy-per-parameter curve): every kept layer takes one
//! of the granularities S, M, L, XL; going deeper, the granularity never
//! decreases and rises by at most one step from one layer to the next. Of
//! these choices, the one with the most parameters within the budget wins;
//! ties go to the choice with fewer changes, then to the one that widens
//! later layers (the lexicographically smallest granularity sequence).
//!
//! The search is polynomial, not an enumeration of every choice (for g
//! granularities and L layers there are about L^(g−1) of them, each costing
//! L to count: a 1,000-layer model took minutes). A choice is a start
//! granularity and the layers where it rises (at most g − 1 of them); its
//! count is a sum of per-granularity prefix sums. For every start and every
//! placement of all rises but the last, the last rise is found by binary
//! search: with each layer's cost non-decreasing in its granularity, moving
//! the last rise deeper never adds parameters. That is O(L^(g−2) · log L)
//! steps — O(L² log L) for the four granularities, about 10⁷ for 1,000 layers —
//! and [`MAX_LAYERS`] bounds L.

/// The most kept layers a budget search runs over: 4,096 layers take about
/// 10⁸ steps (seconds). Real MatFormer models have tens of layers; a config
/// claiming more is refused rather than searched for minutes.
pub const MAX_LAYERS: usize = 4096;

/// A candidate's rank: the best has the most parameters, then the fewest
/// rises, then the lowest start, then the latest rises (first rise first).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Candidate {
    count: u128,
    start: usize,
    /// The layers where the granularity rises by one, ascending.
    rises: Vec<usize>,
}

impl Candidate {
    /// Whether `self` is preferred to `other` by the rule.
    fn beats(&self, other: &Candidate) -> bool {
        use std::cmp::{Ordering, Reverse};
        let key = |c: &Candidate| (Reverse(c.count), c.rises.len(), c.start);
        match key(self).cmp(&key(other)) {
            Ordering::Less => true,
            Ordering::Greater => false,
            // Same length: the later rise at the first difference is smaller.
            Ordering::Equal => self
                .rises
                .iter()
                .map(Reverse)
                .lt(other.rises.iter().map(Reverse)),
        }
    }

    fn granularities(&self, layers: usize) -> Vec<usize> {
        let mut level = self.start;
        let mut rises = self.rises.iter().peekable();
        (0..layers)
            .map(|layer| {
                if rises.next_if(|&&r| r == layer).is_some() {
                    level += 1;
                }
                level
            })
            .collect()
    }
}

/// The granularity indices (one per layer) the rule picks, where `costs[i][g]`
/// is layer i's parameter count at granularity g (non-decreasing in g, the
/// same number of granularities for every layer) and `fixed` the parameters
/// outside them; `None` when even the smallest choice exceeds `budget`.
///
/// Panics if `costs` has more than [`MAX_LAYERS`] layers (callers refuse
/// those first) or a layer's cost decreases with its granularity.
pub fn choose(fixed: u64, costs: &[Vec<u64>], budget: u64) -> Option<Vec<usize>> {
    let layers = costs.len();
    assert!(
        layers <= MAX_LAYERS,
        "{layers} layers: callers check MAX_LAYERS"
    );
    let granularities = costs.first().map_or(0, Vec::len);
    assert!(
        costs
            .iter()
            .all(|c| c.len() == granularities && c.windows(2).all(|w| w[0] <= w[1])),
        "each layer's costs are non-decreasing in the granularity"
    );
    if layers == 0 || granularities == 0 {
        return (layers == 0 && fixed <= budget).then(Vec::new);
    }
    // prefix[g][i]: layers 0..i at granularity g.
    let prefix: Vec<Vec<u128>> = (0..granularities)
        .map(|g| {
            let mut sums = Vec::with_capacity(layers + 1);
            sums.push(0u128);
            for cost in costs {
                sums.push(sums.last().expect("one pushed") + u128::from(cost[g]));
            }
            sums
        })
        .collect();
    let search = Search {
        prefix: &prefix,
        layers,
        budget: u128::from(budget),
    };
    let mut best: Option<Candidate> = None;
    for start in 0..granularities {
        for rises in 0..granularities - start {
            let mut placed = Vec::with_capacity(rises);
            search.place(
                u128::from(fixed),
                start,
                rises,
                0,
                &mut placed,
                &mut |candidate| {
                    if best.as_ref().is_none_or(|b| candidate.beats(b)) {
                        best = Some(candidate);
                    }
                },
            );
        }
    }
    best.map(|c| c.granularities(layers))
}

struct Search<'a> {
    prefix: &'a [Vec<u128>],
    layers: usize,
    budget: u128,
}

impl Search<'_> {
    /// Layers `from..to` at granularity `g`.
    fn segment(&self, g: usize, from: usize, to: usize) -> u128 {
        self.prefix[g][to] - self.prefix[g][from]
    }

    /// Places the remaining `left` rises after layer `from` (where the
    /// granularity is `level` and `sum` counts the layers before `from` and
    /// everything outside the layers), and reports the best candidate of each
    /// placement of all rises but the last.
    fn place(
        &self,
        sum: u128,
        level: usize,
        left: usize,
        from: usize,
        placed: &mut Vec<usize>,
        report: &mut dyn FnMut(Candidate),
    ) {
        let start = level - placed.len();
        let candidate = |count: u128, rises: Vec<usize>| Candidate {
            count,
            start,
            rises,
        };
        match left {
            0 => {
                let count = sum + self.segment(level, from, self.layers);
                if count <= self.budget {
                    report(candidate(count, placed.clone()));
                }
            }
            1 => {
                // The last rise at layer p ∈ (from, layers): the count does
                // not grow as p moves deeper, so the p within budget form a
                // suffix; its first p has the most parameters, and the last p
                // with that count is the latest rise among equals.
                let lowest = from + 1;
                if lowest >= self.layers {
                    return;
                }
                let count = |p: usize| {
                    sum + self.segment(level, from, p) + self.segment(level + 1, p, self.layers)
                };
                let first = partition_point(lowest, self.layers, |p| count(p) > self.budget);
                if first == self.layers {
                    return;
                }
                let most = count(first);
                let last = partition_point(first, self.layers, |p| count(p) >= most) - 1;
                let mut rises = placed.clone();
                rises.push(last);
                report(candidate(most, rises));
            }
            _ => {
                // Leave room for the other rises, one layer each.
                for p in from + 1..self.layers.saturating_sub(left - 1) {
                    let here = sum + self.segment(level, from, p);
                    if here > self.budget {
                        // Later rises only add layers at this level.
                        break;
                    }
                    placed.push(p);
                    self.place(here, level + 1, left - 1, p, placed, report);
                    placed.pop();
                }
            }
        }
    }
}

/// The first p in `from..to` where `predicate` is false (it holds on a
/// prefix of the range), or `to`.
fn partition_point(from: usize, to: usize, predicate: impl Fn(usize) -> bool) -> usize {
    let (mut low, mut high) = (from, to);
    while low < high {
        let middle = low + (high - low) / 2;
        if predicate(middle) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    low
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every choice the rule admits, in the order of the former exhaustive
    /// search (start ascending, staying before rising).
    fn all_choices(layers: usize, granularities: usize) -> Vec<Vec<usize>> {
        fn extend(choice: &mut Vec<usize>, layers: usize, g: usize, all: &mut Vec<Vec<usize>>) {
            if choice.len() == layers {
                all.push(choice.clone());
                return;
            }
            let last = *choice.last().expect("started with one layer");
            for next in [last, last + 1] {
                if next < g {
                    choice.push(next);
                    extend(choice, layers, g, all);
                    choice.pop();
                }
            }
        }
        let mut all = vec![];
        for start in 0..granularities {
            extend(&mut vec![start], layers, granularities, &mut all);
        }
        all
    }

    /// The former exhaustive search: the first of the most parameters
    /// within budget and, among those, the fewest changes.
    fn exhaustive(fixed: u64, costs: &[Vec<u64>], budget: u64) -> Option<Vec<usize>> {
        let count =
            |c: &[usize]| fixed + c.iter().enumerate().map(|(i, &g)| costs[i][g]).sum::<u64>();
        let mut best: Option<(u64, usize, Vec<usize>)> = None;
        for choice in all_choices(costs.len(), costs[0].len()) {
            let n = count(&choice);
            if n > budget {
                continue;
            }
            let changes = choice.windows(2).filter(|w| w[0] != w[1]).count();
            if best
                .as_ref()
                .is_none_or(|(c, ch, _)| n > *c || (n == *c && changes < *ch))
            {
                best = Some((n, changes, choice));
            }
        }
        best.map(|(_, _, choice)| choice)
    }

    fn binomial(n: usize, k: usize) -> usize {
        (0..k).fold(1, |acc, i| acc * (n - i) / (i + 1))
    }

    #[test]
    fn the_rule_admits_slowly_widening_choices_only() {
        let all = all_choices(4, 4);
        // Start s, then at most 3 − s single-step rises among 3 gaps.
        let expected: usize = (0..4)
            .map(|s| (0..=3 - s).map(|k| binomial(3, k)).sum::<usize>())
            .sum();
        assert_eq!(all.len(), expected);
        assert!(all.contains(&vec![0, 0, 1, 2]));
        assert!(!all.contains(&vec![0, 2, 2, 2]), "a rise of two steps");
        assert!(!all.contains(&vec![1, 0, 0, 0]), "narrowing with depth");
    }

    /// Layer costs as the extractor makes them: units per layer times the
    /// nested widths 1/8, 1/4, 1/2 and 1 of the layer's width.
    fn costs(per_unit: &[u64], width: u64) -> Vec<Vec<u64>> {
        per_unit
            .iter()
            .map(|&c| [8, 4, 2, 1].iter().map(|d| c * (width / d)).collect())
            .collect()
    }

    /// A 1,000-layer model (the former search did not finish in minutes):
    /// the choice is valid, within budget, and at least as large as every
    /// choice with one rise at most (counted directly).
    #[test]
    fn a_thousand_layers_are_searched_quickly() {
        let per_unit: Vec<u64> = (0..1000).map(|i| 3 + (i * 7919 % 13)).collect();
        let costs = costs(&per_unit, 64);
        let fixed = 12_345;
        let count = |c: &[usize]| fixed + c.iter().zip(&costs).map(|(&g, c)| c[g]).sum::<u64>();
        let smallest = count(&[0; 1000]);
        let largest = count(&[3; 1000]);
        for budget in [(smallest + largest) / 3, largest / 2, largest - 1] {
            let choice = choose(fixed, &costs, budget).expect("the smallest fits");
            assert_eq!(choice.len(), 1000);
            assert!(choice.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1));
            let got = count(&choice);
            assert!(got <= budget);
            for start in 0..4 {
                for rise in (1..1000).step_by(7) {
                    let other: Vec<usize> = (0..1000)
                        .map(|i| (start + usize::from(i >= rise)).min(3))
                        .collect();
                    let n = count(&other);
                    assert!(n > budget || n <= got, "{n} fits and beats {got}");
                }
            }
        }
        assert_eq!(choose(fixed, &costs, largest), Some(vec![3; 1000]));
        assert_eq!(choose(fixed, &costs, smallest), Some(vec![0; 1000]));
        assert_eq!(choose(fixed, &costs, smallest - 1), None);
    }

    proptest! {
        /// The search picks exactly the former exhaustive search's choice,
        /// ties included (small costs, zero costs and equal widths make many).
        #[test]
        fn the_choice_is_the_exhaustive_searchs(
            costs in proptest::collection::vec(
                proptest::collection::vec(0u64..4, 4).prop_map(|mut c| {
                    // Non-decreasing in the granularity, with plateaus.
                    for g in 1..4 {
                        c[g] += c[g - 1];
                    }
                    c
                }),
                1..8,
            ),
            fixed in 0u64..20,
            budget in 0u64..120,
        ) {
            prop_assert_eq!(choose(fixed, &costs, budget), exhaustive(fixed, &costs, budget));
        }

        #[test]
        fn the_choice_is_the_largest_within_budget(
            per_unit in proptest::collection::vec(1u64..50, 1..7),
            budget in 0u64..4_000,
        ) {
            let costs = costs(&per_unit, 8);
            prop_assert_eq!(choose(100, &costs, budget), exhaustive(100, &costs, budget));
        }
    }
}
