//! The final list, in the documented order: items the run-time catalogue marks retired or
//! out of stock are dropped whatever proposed them, then the request's rules run by kind
//! — hard filters → score changes (boosts, freshness, exposure, in file order) → pins
//! choose their items (never one an exposure rule acted on: the user has seen it enough)
//! → diversity (MMR) with per-list caps fills the other slots → pins
//! take their positions — so a filter can never be undone by a boost, caps hold for
//! everything picked (strict ones also for pins and backfill), and a pinned slot is exact.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    sync::Arc,
};

use recsys_proto::v1::{Availability, CatalogItem, EventCounts, Impression, RuleEffect, WindowedCounts};
use recsys_runtime::catalog::servable;

use crate::{
    mmr::{diversify, normalise, BundleItems, Caps},
    rules::{count_attribute, Action, Condition, CountKind, CountWindow, Rule},
};

const DAY_MS: f64 = 86_400_000.0;

/// The rule name metrics and traces use for the catalogue's own filter (not in the file).
pub const CATALOG_RULE: &str = "catalog_unservable";

/// One request, as the policy needs it.
pub struct ListRequest<'a> {
    /// Ranked candidates, best first: (item, relevance score).
    pub candidates: &'a [(String, f32)],
    pub top_k: usize,
    pub relevance_weight: f32,
    pub context: &'a HashMap<String, String>,
    /// The moment served for, Unix milliseconds (freshness, exposure windows).
    pub now_ms: i64,
    pub impressions: &'a [Impression],
    /// Each item's windowed event counts, when a rule names one (`clicks_1h`...).
    pub item_counts: &'a HashMap<String, WindowedCounts>,
    /// Rank's new-item pick(s) (`RerankCandidate.cold_start`): the `cold_start` attribute.
    pub cold_start: &'a HashSet<String>,
    /// Keep each item's rule effects.
    pub debug: bool,
}

/// An item of the final list.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub item_id: String,
    /// The relevance score it came in with.
    pub score: f32,
    /// Its MMR objective (its adjusted relevance for a pinned item).
    pub rerank_score: f32,
    pub effects: Vec<RuleEffect>,
}

/// How often each rule acted on this request: (rule, action) → items.
pub type Firings = HashMap<(String, &'static str), u64>;

/// What rerank knows of one candidate: the bundle's view and the run-time catalogue's.
struct ItemView<'a> {
    bundle: Option<&'a crate::mmr::BundleItem>,
    catalog: Option<Arc<CatalogItem>>,
    counts: Option<&'a WindowedCounts>,
    cold_start: bool,
}

impl ItemView<'_> {
    /// Publish time in Unix ms: the catalogue's, else 1 January of the bundle's year.
    fn published_ms(&self) -> Option<i64> {
        match (&self.catalog, self.bundle) {
            (Some(item), _) if item.publish_time_ms > 0 => Some(item.publish_time_ms),
            (_, Some(bundle)) if bundle.year > 1970 => Some(year_start_ms(bundle.year)),
            _ => None,
        }
    }

    /// An attribute by name: the built-in ones, then the catalogue's free-form attributes.
    fn attribute(&self, name: &str, now_ms: i64) -> Option<Cow<'_, str>> {
        let catalog = self.catalog.as_deref();
        match name {
            "category" => match catalog {
                Some(item) if !item.category.is_empty() => Some(Cow::Borrowed(item.category.as_str())),
                _ => self.bundle.map(|bundle| Cow::Borrowed(bundle.category.as_str())),
            },
            "promoted" => Some(Cow::Borrowed(if catalog.is_some_and(|item| item.promoted) { "true" } else { "false" })),
            "cold_start" => Some(Cow::Borrowed(if self.cold_start { "true" } else { "false" })),
            "availability" => {
                Some(Cow::Borrowed(match catalog.map_or(Availability::Unspecified, |item| item.availability()) {
                    Availability::Unspecified => "unspecified",
                    Availability::InStock => "in_stock",
                    Availability::OutOfStock => "out_of_stock",
                }))
            }
            "publish_time_ms" => self.published_ms().map(|ms| Cow::Owned(ms.to_string())),
            "age_days" => self.published_ms().map(|ms| Cow::Owned(((now_ms - ms) as f64 / DAY_MS).to_string())),
            _ => match count_attribute(name) {
                Some((kind, window)) => self.count(kind, window).map(Cow::Owned),
                None => catalog.and_then(|item| item.attributes.get(name)).map(|value| Cow::Borrowed(value.as_str())),
            },
        }
    }

    /// One windowed count (or the smoothed CTR, absent without impressions).
    fn count(&self, kind: CountKind, window: CountWindow) -> Option<String> {
        let counts = self.counts?;
        let counts: &EventCounts = match window {
            CountWindow::Hour => counts.last_hour.as_ref(),
            CountWindow::Day => counts.last_day.as_ref(),
            CountWindow::Week => counts.last_7_days.as_ref(),
            CountWindow::Month => counts.last_30_days.as_ref(),
        }?;
        Some(match kind {
            CountKind::Impressions => counts.impressions.to_string(),
            CountKind::Clicks => counts.clicks.to_string(),
            CountKind::Likes => counts.likes.to_string(),
            CountKind::Purchases => counts.purchases.to_string(),
            CountKind::Ctr => counts.ctr?.to_string(),
        })
    }

    fn meets(&self, when: &[Condition], request: &ListRequest<'_>) -> bool {
        when.iter().all(|condition| {
            condition.holds(self.attribute(&condition.attribute, request.now_ms).as_deref(), request.context)
        })
    }
}

/// Days from the Unix epoch to 1 January of `year` (proleptic Gregorian), in ms.
fn year_start_ms(year: u32) -> i64 {
    let y = i64::from(year) - 1;
    let days = 365 * (y - 1969) + (y / 4 - 1969 / 4) - (y / 100 - 1969 / 100) + (y / 400 - 1969 / 400);
    days * 86_400_000
}

/// Builds the final list of one request under `rules` (already chosen for its scene and
/// variants), and counts what each rule did.
pub fn arrange(
    request: &ListRequest<'_>,
    rules: &[&Rule],
    bundle: &BundleItems,
    catalog: &recsys_runtime::catalog::Catalog,
) -> (Vec<Placed>, Firings) {
    let candidates = request.candidates;
    let ids: Vec<&str> = candidates.iter().map(|(id, _)| id.as_str()).collect();
    let views: Vec<ItemView<'_>> = catalog
        .get_many(ids.iter().copied())
        .into_iter()
        .zip(&ids)
        .map(|(catalog, id)| ItemView {
            bundle: bundle.get(id),
            catalog,
            counts: request.item_counts.get(*id),
            cold_start: request.cold_start.contains(*id),
        })
        .collect();
    let scores: Vec<f32> = candidates.iter().map(|(_, score)| *score).collect();
    let mut relevance = normalise(&scores);
    let mut effects: Vec<Vec<RuleEffect>> = vec![Vec::new(); candidates.len()];
    let mut firings = Firings::new();
    let mut fire = |rule: &str, action: &'static str| *firings.entry((rule.to_string(), action)).or_default() += 1;

    // Hard filters: the catalogue's, then the file's.
    let mut pool: Vec<usize> = Vec::with_capacity(candidates.len());
    'candidates: for (n, view) in views.iter().enumerate() {
        if view.catalog.as_deref().is_some_and(|item| !servable(item)) {
            fire(CATALOG_RULE, "filter");
            continue;
        }
        for rule in rules {
            if let Action::Filter { when } = &rule.action {
                if view.meets(when, request) {
                    fire(&rule.name, "filter");
                    continue 'candidates;
                }
            }
        }
        pool.push(n);
    }

    // Score changes, each recorded as an effect.
    let shown = exposures(request);
    let mut adjust = |n: usize, rule: &Rule, action: &'static str, after: f32, relevance: &mut [f32]| {
        if request.debug {
            effects[n].push(RuleEffect {
                rule: rule.name.clone(),
                action: action.into(),
                score_before: relevance[n],
                score_after: after,
                position: 0,
            });
        }
        relevance[n] = after;
    };
    let mut dropped = vec![false; candidates.len()];
    // Items an exposure rule acted on: the user has seen them enough, so no pin forces them.
    let mut fatigued = vec![false; candidates.len()];
    for rule in rules {
        for &n in &pool {
            let current = relevance[n];
            match &rule.action {
                Action::Boost { when, multiply, add } if views[n].meets(when, request) => {
                    adjust(n, rule, "boost", current * multiply + add, &mut relevance);
                    fire(&rule.name, "boost");
                }
                Action::Freshness { half_life_days, weight } => {
                    if let Some(published) = views[n].published_ms() {
                        let age_days = ((request.now_ms - published) as f64 / DAY_MS).max(0.0);
                        let lift = weight * 0.5f64.powf(age_days / half_life_days) as f32;
                        adjust(n, rule, "freshness", current + lift, &mut relevance);
                        fire(&rule.name, "freshness");
                    }
                }
                Action::Exposure { max_impressions, window_hours, multiply } => {
                    let since = request.now_ms - (window_hours * 3_600_000.0) as i64;
                    let count = shown.get(ids[n]).map_or(0, |times| times.iter().filter(|&&t| t > since).count());
                    if count >= *max_impressions as usize {
                        fatigued[n] = true;
                        match multiply {
                            Some(multiply) => adjust(n, rule, "exposure", current * multiply, &mut relevance),
                            None => dropped[n] = true,
                        }
                        fire(&rule.name, if multiply.is_some() { "exposure" } else { "filter" });
                    }
                }
                _ => {}
            }
        }
    }
    pool.retain(|&n| !dropped[n]);

    // Pins choose their items first (the best of those meeting the condition), so MMR
    // fills the other slots; pinned items count towards the caps.
    let mut caps = Caps::default();
    let mut cap_names = Vec::new();
    for rule in rules {
        if let Action::Cap { attribute, max_per_list, strict } = &rule.action {
            let values = views
                .iter()
                .map(|view| {
                    view.attribute(attribute, request.now_ms)
                        .map(|value| value.split('|').filter(|v| !v.is_empty()).map(String::from).collect())
                        .unwrap_or_default()
                })
                .collect();
            caps.add(*max_per_list, *strict, values);
            cap_names.push(rule.name.as_str());
        }
    }
    let mut pinned: Vec<(u32, usize, &str)> = Vec::new();
    for rule in rules {
        if let Action::Pin { when, positions } = &rule.action {
            // Only slots the list has: a pin past top_k must not take its item out of it.
            let mut free: Vec<u32> = positions
                .iter()
                .copied()
                .filter(|&p| p as usize <= request.top_k && pinned.iter().all(|(taken, _, _)| *taken != p))
                .collect();
            free.sort_unstable();
            let mut matching: Vec<usize> =
                pool.iter().copied().filter(|&n| !fatigued[n] && views[n].meets(when, request)).collect();
            matching.sort_by(|&a, &b| relevance[b].total_cmp(&relevance[a]).then(a.cmp(&b)));
            let mut slots = free.into_iter();
            for n in matching {
                // A strict cap holds for pinned items too.
                if caps.breaks_strict(n) {
                    continue;
                }
                let Some(position) = slots.next() else { break };
                pinned.push((position, n, rule.name.as_str()));
                pool.retain(|&m| m != n);
                caps.count(n);
                fire(&rule.name, "pin");
            }
        }
    }
    pinned.sort_unstable();

    let wanted = request.top_k.saturating_sub(pinned.len());
    let picks = diversify(&ids, &relevance, pool, wanted, request.relevance_weight, bundle, &mut caps);
    for (name, &refused) in cap_names.iter().zip(&caps.refused) {
        if refused > 0 {
            *firings.entry((name.to_string(), "cap")).or_default() += refused;
        }
    }
    let soft_caps: Vec<&str> = rules
        .iter()
        .filter(|rule| matches!(rule.action, Action::Cap { strict: false, .. }))
        .map(|rule| rule.name.as_str())
        .collect();
    let mut list: Vec<Placed> = picks
        .into_iter()
        .map(|pick| Placed {
            item_id: ids[pick.index].to_string(),
            score: scores[pick.index],
            rerank_score: pick.mmr_score,
            effects: {
                let mut item_effects = std::mem::take(&mut effects[pick.index]);
                if pick.backfill && request.debug {
                    let score = relevance[pick.index];
                    item_effects.push(RuleEffect {
                        // Served past the soft caps, the window having nothing else left.
                        rule: soft_caps.join(","),
                        action: "cap_backfill".into(),
                        score_before: score,
                        score_after: score,
                        position: 0,
                    });
                }
                item_effects
            },
        })
        .collect();
    for (position, n, rule) in pinned {
        let mut item_effects = std::mem::take(&mut effects[n]);
        // A list shorter than the slot puts the item last: the effect says where it is.
        let at = (position as usize - 1).min(list.len());
        if request.debug {
            item_effects.push(RuleEffect {
                rule: rule.to_string(),
                action: "pin".into(),
                score_before: relevance[n],
                score_after: relevance[n],
                position: at as u32 + 1,
            });
        }
        list.insert(
            at,
            Placed { item_id: ids[n].to_string(), score: scores[n], rerank_score: relevance[n], effects: item_effects },
        );
    }
    (list, firings)
}

/// Times each item was shown to the user.
fn exposures<'a>(request: &ListRequest<'a>) -> HashMap<&'a str, Vec<i64>> {
    let mut shown: HashMap<&str, Vec<i64>> = HashMap::new();
    for impression in request.impressions {
        if impression.timestamp_ms <= request.now_ms {
            shown.entry(impression.item_id.as_str()).or_default().push(impression.timestamp_ms);
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mmr::BundleItem, rules::RuleSet};
    use recsys_runtime::catalog::Catalog;

    const NOW: i64 = 1_700_000_000_000;

    /// Ten items, best first: i0..i9, genres alternating drama / comedy, all from 1995.
    fn bundle() -> BundleItems {
        BundleItems::from_items(
            (0..10)
                .map(|n| {
                    let (bits, category) = if n % 2 == 0 { (1, "Drama") } else { (2, "Comedy") };
                    (format!("i{n}"), BundleItem { genre_bits: bits, category: category.into(), year: 1995 })
                })
                .collect(),
        )
    }

    fn candidates() -> Vec<(String, f32)> {
        (0..10).map(|n| (format!("i{n}"), 1.0 - n as f32 * 0.1)).collect()
    }

    fn run(rules: &str, catalog: &Catalog, impressions: &[Impression], top_k: usize) -> (Vec<Placed>, Firings) {
        run_with(rules, catalog, impressions, &HashMap::new(), &HashSet::new(), top_k)
    }

    fn run_with(
        rules: &str,
        catalog: &Catalog,
        impressions: &[Impression],
        item_counts: &HashMap<String, WindowedCounts>,
        cold_start: &HashSet<String>,
        top_k: usize,
    ) -> (Vec<Placed>, Firings) {
        let rules = RuleSet::parse(rules).unwrap();
        let chosen = rules.for_request("", &[]);
        let candidates = candidates();
        let context = HashMap::from([("user_age".to_string(), "15".to_string())]);
        let request = ListRequest {
            candidates: &candidates,
            top_k,
            relevance_weight: 1.0,
            context: &context,
            now_ms: NOW,
            impressions,
            item_counts,
            cold_start,
            debug: true,
        };
        arrange(&request, &chosen, &bundle(), catalog)
    }

    fn ids(list: &[Placed]) -> Vec<&str> {
        list.iter().map(|item| item.item_id.as_str()).collect()
    }

    fn catalog(items: Vec<CatalogItem>) -> Catalog {
        let catalog = Catalog::default();
        catalog.apply(items, 1);
        catalog
    }

    fn record(id: &str) -> CatalogItem {
        CatalogItem { item_id: id.into(), ..CatalogItem::default() }
    }

    #[test]
    fn without_rules_the_ranked_order_stays() {
        let (list, firings) = run("", &Catalog::default(), &[], 5);
        assert_eq!(ids(&list), ["i0", "i1", "i2", "i3", "i4"]);
        assert!(firings.is_empty());
    }

    #[test]
    fn retired_and_out_of_stock_items_are_never_served() {
        let catalog = catalog(vec![
            CatalogItem { retired: true, ..record("i0") },
            CatalogItem { availability: Availability::OutOfStock as i32, ..record("i1") },
            CatalogItem { availability: Availability::InStock as i32, ..record("i2") },
        ]);
        let (list, firings) = run("", &catalog, &[], 3);
        assert_eq!(ids(&list), ["i2", "i3", "i4"]);
        assert_eq!(firings[&(CATALOG_RULE.to_string(), "filter")], 2);
    }

    #[test]
    fn a_filter_compares_attributes_with_the_request_context() {
        let catalog = catalog(vec![
            CatalogItem { attributes: [("age_rating".to_string(), "18".to_string())].into(), ..record("i0") },
            CatalogItem { attributes: [("age_rating".to_string(), "12".to_string())].into(), ..record("i1") },
        ]);
        let rules = r#"
            [[rule]]
            name = "age"
            kind = "filter"
            when = [{ attribute = "age_rating", op = "gt", context = "user_age" }]
        "#;
        let (list, _) = run(rules, &catalog, &[], 3);
        assert_eq!(ids(&list), ["i1", "i2", "i3"]);
    }

    #[test]
    fn a_boost_lifts_promoted_items_and_says_so() {
        let catalog = catalog(vec![CatalogItem { promoted: true, ..record("i5") }]);
        let rules = r#"
            [[rule]]
            name = "promoted"
            kind = "boost"
            when = [{ attribute = "promoted", op = "eq", value = true }]
            add = 0.6
        "#;
        let (list, firings) = run(rules, &catalog, &[], 3);
        assert_eq!(ids(&list), ["i5", "i0", "i1"]);
        let effect = &list[0].effects[0];
        assert_eq!((effect.rule.as_str(), effect.action.as_str()), ("promoted", "boost"));
        assert!(effect.score_after > effect.score_before);
        assert_eq!(firings[&("promoted".to_string(), "boost")], 1);
    }

    #[test]
    fn freshness_lifts_a_new_item_over_older_ones() {
        let catalog = catalog(vec![CatalogItem { publish_time_ms: NOW - 86_400_000, ..record("i4") }]);
        let rules = r#"
            [[rule]]
            name = "fresh"
            kind = "freshness"
            half_life_days = 7
            weight = 0.5
        "#;
        let (list, _) = run(rules, &catalog, &[], 3);
        assert_eq!(list[0].item_id, "i4", "{:?}", ids(&list));
        assert_eq!(list[0].effects[0].action, "freshness");
    }

    #[test]
    fn an_item_shown_too_often_is_filtered_or_demoted() {
        let shown = |at: i64| Impression { item_id: "i0".into(), timestamp_ms: at };
        let impressions = [shown(NOW - 1_000), shown(NOW - 2_000), shown(NOW - 40 * 3_600_000)];
        let filter = r#"
            [[rule]]
            name = "fatigue"
            kind = "exposure"
            max_impressions = 2
            window_hours = 24
        "#;
        assert_eq!(ids(&run(filter, &Catalog::default(), &impressions, 2).0), ["i1", "i2"]);
        let three = r#"
            [[rule]]
            name = "fatigue"
            kind = "exposure"
            max_impressions = 3
            window_hours = 24
        "#;
        assert_eq!(ids(&run(three, &Catalog::default(), &impressions, 2).0), ["i0", "i1"], "old impressions age out");
        let demote = format!("{filter}multiply = 0.1\n");
        let (list, _) = run(&demote, &Catalog::default(), &impressions, 10);
        assert_eq!(ids(&list)[7..], ["i8", "i0", "i9"], "demoted from first to ninth");
    }

    #[test]
    fn a_cap_holds_and_a_pin_lands_in_its_slot() {
        let catalog = catalog(vec![CatalogItem { promoted: true, ..record("i9") }]);
        let rules = r#"
            [[rule]]
            name = "genre_cap"
            kind = "cap"
            attribute = "category"
            max_per_list = 2
            strict = true

            [[rule]]
            name = "promoted_slot"
            kind = "pin"
            when = [{ attribute = "promoted", op = "eq", value = true }]
            positions = [3]
        "#;
        let (list, firings) = run(rules, &catalog, &[], 5);
        // i9 (comedy) is pinned at 3 and counts towards the comedy cap of 2; with two of
        // each genre the list ends short rather than break the cap.
        assert_eq!(ids(&list), ["i0", "i1", "i9", "i2"]);
        assert_eq!(list[2].effects.last().unwrap().position, 3);
        assert!(firings[&("genre_cap".to_string(), "cap")] >= 1);
    }

    #[test]
    fn ranks_new_item_pick_takes_the_new_item_slot() {
        let rules = r#"
            [[rule]]
            name = "new_item_slot"
            kind = "pin"
            when = [{ attribute = "cold_start", op = "eq", value = true }]
            positions = [4]
        "#;
        let pick = HashSet::from(["i9".to_string()]);
        let (list, firings) = run_with(rules, &Catalog::default(), &[], &HashMap::new(), &pick, 5);
        assert_eq!(ids(&list)[3], "i9", "the least relevant candidate, in its slot: {:?}", ids(&list));
        assert_eq!(firings[&("new_item_slot".to_string(), "pin")], 1);
        // Without rank's mark the rule finds nothing.
        let (list, _) = run(rules, &Catalog::default(), &[], 5);
        assert!(!ids(&list).contains(&"i9"));
        // Seen three times today, it is left to its relevance: the slot does not repeat it.
        let fatigue = format!("{rules}\n[[rule]]\nname = \"fatigue\"\nkind = \"exposure\"\nmax_impressions = 3\nwindow_hours = 24\nmultiply = 0.5\n");
        let seen: Vec<Impression> =
            (1..=3).map(|n| Impression { item_id: "i9".into(), timestamp_ms: NOW - n * 60_000 }).collect();
        let (list, firings) = run_with(&fatigue, &Catalog::default(), &seen, &HashMap::new(), &pick, 5);
        assert!(!ids(&list).contains(&"i9"), "{:?}", ids(&list));
        assert!(!firings.contains_key(&("new_item_slot".to_string(), "pin")));
    }

    #[test]
    fn a_pin_past_the_list_leaves_its_item_to_the_ranking() {
        let catalog = catalog(vec![CatalogItem { promoted: true, ..record("i1") }]);
        let rules = r#"
            [[rule]]
            name = "slot"
            kind = "pin"
            when = [{ attribute = "promoted", op = "eq", value = true }]
            positions = [5]
        "#;
        assert_eq!(ids(&run(rules, &catalog, &[], 2).0), ["i0", "i1"]);
    }

    #[test]
    fn a_boost_cannot_bring_back_a_filtered_item() {
        let catalog = catalog(vec![CatalogItem { promoted: true, retired: true, ..record("i0") }]);
        let rules = r#"
            [[rule]]
            name = "promoted"
            kind = "pin"
            when = [{ attribute = "promoted", op = "eq", value = true }]
            positions = [1]
        "#;
        let (list, _) = run(rules, &catalog, &[], 3);
        assert!(!ids(&list).contains(&"i0"));
    }

    #[test]
    fn a_trending_item_is_lifted_by_its_counts() {
        let hour = |clicks| WindowedCounts {
            last_hour: Some(EventCounts { clicks, impressions: 40, ctr: Some(0.2), ..EventCounts::default() }),
            ..WindowedCounts::default()
        };
        let counts = HashMap::from([("i7".to_string(), hour(12)), ("i1".to_string(), hour(3))]);
        let rules = r#"
            [[rule]]
            name = "trending"
            kind = "boost"
            when = [{ attribute = "clicks_1h", op = "ge", value = 10 }]
            add = 1.0
        "#;
        let (list, firings) = run_with(rules, &Catalog::default(), &[], &counts, &HashSet::new(), 3);
        assert_eq!(ids(&list), ["i7", "i0", "i1"]);
        assert_eq!(firings[&("trending".to_string(), "boost")], 1);
        let (list, _) = run(rules, &Catalog::default(), &[], 3);
        assert_eq!(ids(&list), ["i0", "i1", "i2"], "without counts the condition is not met");
    }

    #[test]
    fn year_start_is_the_calendar_date() {
        assert_eq!(year_start_ms(1970), 0);
        assert_eq!(year_start_ms(2000), 946_684_800_000);
        assert_eq!(year_start_ms(1998), 883_612_800_000);
    }
}
