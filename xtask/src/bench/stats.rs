//! The statistics the report prints: medians and the median of pairwise ratios.
//!
//! A pair is one run of ours and one run of the baseline taken back to back; the ratio of a pair
//! is `ours / baseline`, so a ratio below 1.0 means ours was faster in that pair. The median of
//! the per-pair ratios is reported next to the two medians because it cancels slow drifts of the
//! machine (another build starting, page cache growing) that hit both halves of a pair alike.

use serde::Serialize;

/// The median of `xs`, or `None` when `xs` is empty or holds a NaN. With an even count it is the
/// mean of the two middle values.
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() || xs.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `ours[i] / theirs[i]` for every pair where both exist and `theirs[i]` is positive.
pub fn pair_ratios(ours: &[f64], theirs: &[f64]) -> Vec<f64> {
    ours.iter()
        .zip(theirs)
        .filter(|(_, t)| **t > 0.0)
        .map(|(o, t)| o / t)
        .collect()
}

/// What the report shows for one measured case.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Median seconds of ours.
    pub ours_median: Option<f64>,
    /// Median seconds of the baseline (`None` for cases without one).
    pub theirs_median: Option<f64>,
    /// Median of the per-pair ratios ours/baseline.
    pub ratio_median: Option<f64>,
    /// Smallest and largest per-pair ratio, to show the spread.
    pub ratio_min: Option<f64>,
    /// See `ratio_min`.
    pub ratio_max: Option<f64>,
}

/// Summarises the samples of one case.
pub fn summarize(ours: &[f64], theirs: &[f64]) -> Summary {
    let ratios = pair_ratios(ours, theirs);
    Summary {
        ours_median: median(ours),
        theirs_median: median(theirs),
        ratio_median: median(&ratios),
        ratio_min: ratios.iter().copied().reduce(f64::min),
        ratio_max: ratios.iter().copied().reduce(f64::max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn ratios_are_pairwise_and_skip_zero_baselines() {
        assert_eq!(
            pair_ratios(&[1.0, 2.0, 3.0], &[2.0, 0.0, 1.0]),
            vec![0.5, 3.0]
        );
        // Extra samples on one side have no partner and are ignored.
        assert_eq!(pair_ratios(&[1.0, 1.0], &[4.0]), vec![0.25]);
    }

    #[test]
    fn median_of_ratios_is_not_ratio_of_medians() {
        // The machine slows down 10x in the middle of pair 3 (between its halves) and stays
        // slow. Ours is half the baseline in every other pair: the ratio of the medians says
        // 0.05, the median of the pairwise ratios says 0.5.
        let ours = [1.0, 1.0, 1.0, 10.0, 10.0];
        let theirs = [2.0, 2.0, 20.0, 20.0, 20.0];
        let s = summarize(&ours, &theirs);
        assert_eq!(s.ours_median, Some(1.0));
        assert_eq!(s.theirs_median, Some(20.0));
        assert_eq!(s.ratio_median, Some(0.5));
        assert_eq!(s.ratio_min, Some(0.05));
        assert_eq!(s.ratio_max, Some(0.5));
    }

    #[test]
    fn summary_without_baseline() {
        let s = summarize(&[0.2, 0.1, 0.3], &[]);
        assert_eq!(s.ours_median, Some(0.2));
        assert_eq!(s.theirs_median, None);
        assert_eq!(s.ratio_median, None);
    }
}
