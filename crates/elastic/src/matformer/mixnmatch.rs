//! Mix'n'Match under a parameter budget.
//!
//! The rule (after the MatFormer paper's observation that submodels whose
//! granularity changes slowly and does not decrease with depth land on the
//! trained models' accuracy-per-parameter curve): every kept layer takes one
//! of the granularities S, M, L, XL; going deeper, the granularity never
//! decreases and rises by at most one step from one layer to the next. Of
//! these choices, the one with the most parameters within the budget wins;
//! ties go to the choice with fewer changes, then to the one that widens
//! later layers (enumeration order). Enumeration is exhaustive — for g
//! granularities and L layers there are at most Σ_k C(L−1, k), k < g,
//! choices per starting granularity (about 6,000 for 35 layers).

/// One candidate: a granularity index per layer.
fn for_each_choice(layers: usize, granularities: usize, visit: &mut dyn FnMut(&[usize])) {
    fn extend(
        choice: &mut Vec<usize>,
        layers: usize,
        granularities: usize,
        visit: &mut dyn FnMut(&[usize]),
    ) {
        if choice.len() == layers {
            visit(choice);
            return;
        }
        let last = *choice.last().expect("started with one layer");
        // Staying first, so among equal parameter counts fewer changes win.
        for next in [last, last + 1] {
            if next < granularities {
                choice.push(next);
                extend(choice, layers, granularities, visit);
                choice.pop();
            }
        }
    }
    for start in 0..granularities {
        let mut choice = vec![start];
        extend(&mut choice, layers, granularities, visit);
    }
}

/// The granularity indices (one per layer) the rule picks, given each
/// choice's parameter count; `None` when even the smallest exceeds `budget`.
pub fn choose(
    layers: usize,
    granularities: usize,
    budget: u64,
    parameters: &dyn Fn(&[usize]) -> u64,
) -> Option<Vec<usize>> {
    let mut best: Option<(u64, usize, Vec<usize>)> = None;
    for_each_choice(layers, granularities, &mut |choice| {
        let count = parameters(choice);
        if count > budget {
            return;
        }
        let changes = choice.windows(2).filter(|w| w[0] != w[1]).count();
        let better = match &best {
            None => true,
            Some((c, ch, _)) => count > *c || (count == *c && changes < *ch),
        };
        if better {
            best = Some((count, changes, choice.to_vec()));
        }
    });
    best.map(|(_, _, choice)| choice)
}

/// Every choice the rule admits.
#[cfg(test)]
fn all_choices(layers: usize, granularities: usize) -> Vec<Vec<usize>> {
    let mut all = vec![];
    for_each_choice(layers, granularities, &mut |c| all.push(c.to_vec()));
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        assert_eq!(
            all_choices(35, 4).len(),
            (0..4)
                .map(|s| (0..=3 - s).map(|k| binomial(34, k)).sum::<usize>())
                .sum::<usize>()
        );
    }

    proptest! {
        #[test]
        fn the_choice_is_the_largest_within_budget(
            costs in proptest::collection::vec(1u64..50, 1..6),
            budget in 0u64..2_000,
        ) {
            let widths = [1u64, 2, 4, 8];
            let parameters = |c: &[usize]| -> u64 {
                100 + c.iter().zip(&costs).map(|(&g, &cost)| cost * widths[g]).sum::<u64>()
            };
            let layers = costs.len();
            let best = choose(layers, 4, budget, &parameters);
            let admissible: Vec<u64> = all_choices(layers, 4)
                .iter()
                .map(|c| parameters(c))
                .filter(|&p| p <= budget)
                .collect();
            match best {
                None => prop_assert!(admissible.is_empty()),
                Some(choice) => {
                    prop_assert!(parameters(&choice) <= budget);
                    prop_assert_eq!(Some(parameters(&choice)), admissible.iter().copied().max());
                }
            }
        }
    }
}
