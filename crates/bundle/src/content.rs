//! Vectors for items added after training, from their attributes: training's content map
//! (`training/recsys_training/content.py`), shipped in the manifest's `cold_start.content`.
//! The encoding here must equal `ContentEncoding.features` there (both test the same cases).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The manifest's form: the genre vocabulary, the newest release year and the era edges
/// (years before it) the features count with, and the map's rows (one per feature).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentMapFile {
    pub genres: Vec<String>,
    pub newest_year: u32,
    pub era_edges: Vec<u32>,
    pub mapping: Vec<Vec<f32>>,
}

/// Features → vector: genres (multi-hot), release era (one-hot; an unknown year has its
/// own column), a constant; the vector is the features times the map.
#[derive(Debug, Clone)]
pub struct ContentMap {
    genres: HashMap<String, usize>,
    newest_year: u32,
    era_edges: Vec<u32>,
    /// Row-major [features, dim].
    mapping: Vec<f32>,
    dim: usize,
}

impl ContentMap {
    /// Checks the shapes against the bundle's embedding dimension.
    pub fn new(file: &ContentMapFile, dim: usize) -> Result<Self, String> {
        let features = file.genres.len() + file.era_edges.len() + 2;
        if file.mapping.len() != features || file.mapping.iter().any(|row| row.len() != dim) {
            return Err(format!(
                "cold_start.content.mapping must be {features} rows of {dim} (genres, eras, unknown year, intercept)"
            ));
        }
        if file.era_edges.first() != Some(&0) || file.era_edges.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err("cold_start.content.era_edges must start at 0 and increase".into());
        }
        Ok(Self {
            genres: file.genres.iter().enumerate().map(|(n, genre)| (genre.clone(), n)).collect(),
            newest_year: file.newest_year,
            era_edges: file.era_edges.clone(),
            mapping: file.mapping.iter().flatten().copied().collect(),
            dim,
        })
    }

    /// The content features of an item with these genres and release year (0: unknown).
    pub fn features<'a>(&self, genres: impl IntoIterator<Item = &'a str>, year: u32) -> Vec<f32> {
        let mut features = vec![0.0; self.genres.len() + self.era_edges.len() + 2];
        for genre in genres {
            if let Some(&column) = self.genres.get(genre) {
                features[column] = 1.0;
            }
        }
        let era = if year > 0 {
            // A year past the newest counts as the newest era.
            let before_newest = self.newest_year.saturating_sub(year);
            self.era_edges.iter().take_while(|&&edge| edge <= before_newest).count() - 1
        } else {
            self.era_edges.len()
        };
        features[self.genres.len() + era] = 1.0;
        *features.last_mut().expect("at least the intercept") = 1.0;
        features
    }

    /// The item's vector in the bundle's embedding space.
    pub fn vector<'a>(&self, genres: impl IntoIterator<Item = &'a str>, year: u32) -> Vec<f32> {
        let mut vector = vec![0.0; self.dim];
        for (feature, row) in self.features(genres, year).iter().zip(self.mapping.chunks_exact(self.dim)) {
            if *feature != 0.0 {
                for (value, weight) in vector.iter_mut().zip(row) {
                    *value += feature * weight;
                }
            }
        }
        vector
    }
}

/// The (proleptic Gregorian) year of a Unix time in milliseconds; 0 for 0 or earlier
/// (unknown).
pub fn year_of_ms(ms: i64) -> u32 {
    if ms <= 0 {
        return 0;
    }
    // Days to a civil date (Howard Hinnant's algorithm), year only.
    let days = ms.div_euclid(86_400_000) + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // March = 0
    let year = year_of_era + era * 400 + i64::from(month_index >= 10);
    u32::try_from(year).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(dim: usize) -> ContentMap {
        let file = ContentMapFile {
            genres: vec!["Comedy".into(), "Drama".into()],
            newest_year: 1998,
            era_edges: vec![0, 1, 2, 4, 8, 18, 38],
            mapping: (0..11).map(|row| vec![row as f32; dim]).collect(),
        };
        ContentMap::new(&file, dim).unwrap()
    }

    #[test]
    fn features_are_encoded_as_training_encodes_them() {
        // The cases of training/tests/test_content.py.
        let map = map(2);
        let row = |values: [u8; 11]| values.map(f32::from).to_vec();
        assert_eq!(map.features(["Drama", "Western"], 2001), row([0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1]));
        assert_eq!(map.features(["Comedy"], 1960), row([1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]));
        assert_eq!(map.features([], 0), row([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]));
        assert_eq!(map.features(["Drama"], 1991), row([0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1]), "7 years: 4-7");
    }

    #[test]
    fn the_vector_is_the_features_times_the_map() {
        // Row n of the map is n everywhere: Drama (1) + newest era (2) + intercept (10).
        assert_eq!(map(3).vector(["Drama"], 1998), vec![13.0; 3]);
    }

    #[test]
    fn a_map_of_the_wrong_shape_is_refused() {
        let file = ContentMapFile { genres: vec![], newest_year: 0, era_edges: vec![0], mapping: vec![vec![0.0; 2]] };
        assert!(ContentMap::new(&file, 2).unwrap_err().contains("3 rows of 2"));
        let file = ContentMapFile { era_edges: vec![1], mapping: vec![vec![0.0; 2]; 3], ..file };
        assert!(ContentMap::new(&file, 2).unwrap_err().contains("era_edges"));
    }

    #[test]
    fn years_of_unix_times() {
        assert_eq!(year_of_ms(0), 0);
        assert_eq!(year_of_ms(1), 1970);
        assert_eq!(year_of_ms(893_286_638_000), 1998); // 1998-04-22
        assert_eq!(year_of_ms(1_767_225_599_000), 2025); // 2025-12-31 23:59:59
        assert_eq!(year_of_ms(1_767_225_600_000), 2026);
        assert_eq!(year_of_ms(951_782_400_000), 2000); // 2000-02-29
    }
}
