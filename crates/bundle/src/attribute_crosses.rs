//! Automated feature crosses: the degree-2 crosses of a user field and an item field that
//! training kept for this bundle (`training/recsys_training/crosses.py` generates the
//! candidates, measures them on held-out rows and ships the kept tables in the feature
//! configuration's `attribute_crosses`). A cross's value for a user and an item is the mean
//! of the table's lifts over the item's values (a film has several genres); an unknown user
//! or item value contributes nothing, as in training.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::{features::UserAttributes, CatalogItem};

const DAY_SECONDS: i64 = 86_400;

/// A user field a cross reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserField {
    Gender,
    Occupation,
    /// The decade of the user's age ("20" for 20–29); unknown for age 0.
    AgeBand,
    /// The request's UTC hour in quarters of the day: "0" for 0–5 … "3" for 18–23.
    Daypart,
    /// A window statistic rather than an attribute: the item field's values over the
    /// user's latest [`HISTORY_ITEMS`] items, as a lift computed per request.
    History,
}

/// The `history` field reads this many of the user's latest items.
pub const HISTORY_ITEMS: usize = 50;

impl UserField {
    /// The value of an attribute field (`None` for `history`, which has none).
    fn value<'a>(self, user: &UserAttributes<'a>) -> Option<std::borrow::Cow<'a, str>> {
        Some(match self {
            Self::Gender => user.gender.into(),
            Self::Occupation => user.occupation.into(),
            Self::AgeBand if user.age == 0 => "".into(),
            Self::AgeBand => (user.age / 10 * 10).to_string().into(),
            Self::Daypart => (user.request_time.rem_euclid(DAY_SECONDS) / 3_600 / 6).to_string().into(),
            Self::History => return None,
        })
    }
}

/// An item field a cross reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemField {
    Genres,
    /// The decade of release ("1990"); none for an unknown year.
    Decade,
}

impl ItemField {
    fn for_each_value(self, item: &CatalogItem, mut visit: impl FnMut(&str)) {
        match self {
            Self::Genres => item.genres.iter().for_each(|genre| visit(genre)),
            Self::Decade if item.year == 0 => {}
            Self::Decade => visit(&(item.year / 10 * 10).to_string()),
        }
    }
}

/// One kept cross as the bundle ships it: for an attribute field, `lift[u][i]` is the lift
/// of user value `user_values[u]` for item value `item_values[i]`; for `history` the
/// user's row is computed per request from `prior` and `smoothing`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttributeCross {
    /// The cross feature's column name (`cross` in the feature configuration).
    pub name: String,
    pub user_field: UserField,
    pub item_field: ItemField,
    pub user_values: Vec<String>,
    pub item_values: Vec<String>,
    /// Read as f64: training sums the shipped (rounded) values in double precision.
    pub lift: Vec<Vec<f64>>,
    /// Each item value's share of the training interactions.
    pub prior: Vec<f64>,
    /// Pseudo-events pulling a short history towards no lift.
    pub smoothing: f64,
}

/// The kept crosses resolved against one catalogue, built when a bundle is loaded: each
/// item's table columns, so a candidate costs a few additions and no string comparison.
#[derive(Debug, Clone, Default)]
pub struct AttributeCrosses {
    tables: Vec<ResolvedCross>,
}

#[derive(Debug, Clone)]
struct ResolvedCross {
    user_field: UserField,
    user_values: Vec<String>,
    lift: Vec<Vec<f64>>,
    prior: Vec<f64>,
    smoothing: f64,
    /// Compressed rows: item `n`'s table columns are `columns[offsets[n]..offsets[n + 1]]`.
    offsets: Vec<u32>,
    columns: Vec<u16>,
}

impl AttributeCrosses {
    /// Fails on a table whose shape does not match its vocabularies.
    pub fn resolve(crosses: &[AttributeCross], catalog: &[CatalogItem]) -> Result<Self, String> {
        let tables = crosses
            .iter()
            .map(|cross| {
                if cross.lift.len() != cross.user_values.len()
                    || cross.lift.iter().any(|row| row.len() != cross.item_values.len())
                    || cross.item_values.len() > usize::from(u16::MAX)
                {
                    return Err(format!("attribute cross {:?}: lift is not user_values × item_values", cross.name));
                }
                if cross.user_field == UserField::History
                    && (cross.prior.len() != cross.item_values.len() || cross.prior.iter().any(|p| *p <= 0.0))
                {
                    return Err(format!(
                        "attribute cross {:?}: prior is not one positive share per item value",
                        cross.name
                    ));
                }
                let mut offsets = Vec::with_capacity(catalog.len() + 1);
                let mut columns = Vec::new();
                offsets.push(0);
                for item in catalog {
                    cross.item_field.for_each_value(item, |value| {
                        if let Some(column) = cross.item_values.iter().position(|known| known == value) {
                            columns.push(column as u16);
                        }
                    });
                    offsets.push(columns.len() as u32);
                }
                Ok(ResolvedCross {
                    user_field: cross.user_field,
                    user_values: cross.user_values.clone(),
                    lift: cross.lift.clone(),
                    prior: cross.prior.clone(),
                    smoothing: cross.smoothing,
                    offsets,
                    columns,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { tables })
    }

    /// Each cross's lift row for this user: the table's row of their value, or for
    /// `history` the one their latest items make (`history`: catalogue positions, latest
    /// first); `None` when training never saw the value or no history item has one. A
    /// profile's row is the table's own, borrowed.
    pub fn user_lifts(&self, user: &UserAttributes<'_>, history: &[usize]) -> Vec<Option<Cow<'_, [f64]>>> {
        self.tables
            .iter()
            .map(|table| match table.user_field.value(user) {
                Some(value) => table
                    .user_values
                    .iter()
                    .position(|known| *known == value)
                    .map(|row| Cow::Borrowed(table.lift[row].as_slice())),
                None => table.history_lift(&history[..history.len().min(HISTORY_ITEMS)]).map(Cow::Owned),
            })
            .collect()
    }

    /// Cross `cross`'s value for the item at `item` (a catalogue position), given the
    /// user's lift row from [`Self::user_lifts`].
    pub fn value(&self, cross: usize, user_lift: Option<&[f64]>, item: usize) -> f32 {
        let columns = self.tables[cross].columns_of(item);
        match user_lift {
            Some(lifts) if !columns.is_empty() => {
                (columns.iter().map(|&column| lifts[usize::from(column)]).sum::<f64>() / columns.len() as f64) as f32
            }
            _ => 0.0,
        }
    }
}

impl ResolvedCross {
    fn columns_of(&self, item: usize) -> &[u16] {
        &self.columns[self.offsets[item] as usize..self.offsets[item + 1] as usize]
    }

    /// log((n(v) + m·p(v)) / (n + m) / p(v)) over the items' values, each item counting
    /// 1/k to each of its k values; n is the items with any value.
    fn history_lift(&self, items: &[usize]) -> Option<Vec<f64>> {
        let mut counts = vec![0.0; self.prior.len()];
        let mut known = 0usize;
        for &item in items {
            let columns = self.columns_of(item);
            if columns.is_empty() {
                continue;
            }
            known += 1;
            for &column in columns {
                counts[usize::from(column)] += 1.0 / columns.len() as f64;
            }
        }
        (known > 0).then(|| {
            let total = known as f64 + self.smoothing;
            counts
                .iter()
                .zip(&self.prior)
                .map(|(count, prior)| ((count + self.smoothing * prior) / total / prior).ln())
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn item(genres: &[&str], year: u32) -> CatalogItem {
        CatalogItem {
            id: "i".into(),
            title: "t".into(),
            genres: genres.iter().map(|genre| genre.to_string()).collect(),
            year,
            interactions: 0,
            stats: HashMap::new(),
        }
    }

    fn user(gender: &str, age: u32, request_time: i64) -> UserAttributes<'_> {
        UserAttributes { age, gender, occupation: "", event_count: 0, history_timestamps: &[], request_time }
    }

    fn cross(
        user_field: UserField,
        item_field: ItemField,
        user_values: &[&str],
        item_values: &[&str],
    ) -> AttributeCross {
        let lift = (0..user_values.len())
            .map(|u| (0..item_values.len()).map(|i| (10 * u + i + 1) as f64 / 10.0).collect())
            .collect();
        AttributeCross {
            name: format!("{user_field:?}×{item_field:?}"),
            user_field,
            item_field,
            user_values: user_values.iter().map(|v| v.to_string()).collect(),
            item_values: item_values.iter().map(|v| v.to_string()).collect(),
            lift,
            prior: vec![1.0 / item_values.len() as f64; item_values.len()],
            smoothing: 2.0,
        }
    }

    // The same tables, users and items as training's test_crosses.py
    // (`test_columns_match_what_rank_svc_computes`): the two must agree.
    #[test]
    fn a_cross_is_the_mean_lift_over_the_items_values_and_zero_when_unknown() {
        let catalog = [item(&["Comedy", "Drama"], 1995), item(&["Horror"], 0), item(&["Drama"], 1971)];
        let crosses = [
            cross(UserField::Gender, ItemField::Genres, &["F", "M"], &["Comedy", "Drama"]),
            cross(UserField::AgeBand, ItemField::Decade, &["20", "30"], &["1970", "1990"]),
            cross(UserField::Daypart, ItemField::Genres, &["0", "2"], &["Drama"]),
            cross(UserField::History, ItemField::Genres, &[], &["Comedy", "Drama"]),
        ];
        let resolved = AttributeCrosses::resolve(&crosses, &catalog).unwrap();
        // Male, 34, asking at 13:00 UTC (daypart 2); latest first: Drama, Horror, Comedy+Drama.
        let lifts = resolved.user_lifts(&user("M", 34, 86_400 * 3 + 13 * 3_600), &[2, 1, 0]);
        let values: Vec<Vec<f32>> = (0..catalog.len())
            .map(|n| (0..crosses.len()).map(|c| resolved.value(c, lifts[c].as_deref(), n)).collect())
            .collect();
        // history: 2 known items, Comedy 0.5 and Drama 1.5 of them, priors 0.5, smoothing 2.
        let (comedy, drama) = (0.75f64.ln(), 1.25f64.ln());
        let close = |got: &[f32], want: [f64; 4]| got.iter().zip(want).all(|(g, w)| (f64::from(*g) - w).abs() < 1e-6);
        assert!(close(&values[0], [1.15, 1.2, 1.1, (comedy + drama) / 2.0]), "{:?}", values[0]);
        assert!(close(&values[1], [0.0; 4]), "Horror and an unknown year are in no table: {:?}", values[1]);
        assert!(close(&values[2], [1.2, 1.1, 1.1, drama]), "{:?}", values[2]);
        // An unknown gender and age, no history item with a known value: those crosses
        // are 0 for every item; daypart 0 is known.
        let lifts = resolved.user_lifts(&user("", 0, 3 * 3_600), &[1]);
        assert!(lifts[0].is_none() && lifts[1].is_none() && lifts[3].is_none());
        assert_eq!(resolved.value(0, lifts[0].as_deref(), 0), 0.0);
        assert!((resolved.value(2, lifts[2].as_deref(), 2) - 0.1).abs() < 1e-6, "daypart 0 × Drama");
    }

    #[test]
    fn a_table_of_the_wrong_shape_is_refused() {
        let mut bad = cross(UserField::Gender, ItemField::Genres, &["F", "M"], &["Comedy"]);
        bad.lift.pop();
        let error = AttributeCrosses::resolve(&[bad], &[]).unwrap_err();
        assert!(error.contains("lift is not user_values × item_values"), "{error}");
    }
}
