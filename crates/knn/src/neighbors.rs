//! The result of a search.

/// The `k` nearest bank rows of each query.
///
/// Row `i` holds query `i`'s neighbours, sorted ascending by squared Euclidean distance. Distances
/// are never negative and never NaN.
#[derive(Clone, Debug, PartialEq)]
pub struct Neighbors {
    k: usize,
    distances: Vec<f32>,
    indices: Vec<u32>,
}

impl Neighbors {
    /// Assembles a result; `distances` and `indices` both hold `k` entries per query.
    pub(crate) fn new(k: usize, distances: Vec<f32>, indices: Vec<u32>) -> Self {
        debug_assert!(k > 0);
        debug_assert_eq!(distances.len(), indices.len());
        debug_assert_eq!(distances.len() % k, 0);
        Neighbors {
            k,
            distances,
            indices,
        }
    }

    /// The number of neighbours per query.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The number of queries.
    pub fn len(&self) -> usize {
        self.distances.len() / self.k
    }

    /// Whether there are no queries.
    pub fn is_empty(&self) -> bool {
        self.distances.is_empty()
    }

    /// The squared distances and bank indices of query `i`'s neighbours, nearest first.
    ///
    /// # Panics
    ///
    /// Panics if `i >= self.len()`.
    pub fn row(&self, i: usize) -> (&[f32], &[u32]) {
        let range = i * self.k..(i + 1) * self.k;
        (&self.distances[range.clone()], &self.indices[range])
    }

    /// All squared distances, row-major `len() × k`.
    pub fn distances(&self) -> &[f32] {
        &self.distances
    }

    /// All bank indices, row-major `len() × k`.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Splits the result into its squared distances and indices (both row-major `len() × k`).
    pub fn into_parts(self) -> (Vec<f32>, Vec<u32>) {
        (self.distances, self.indices)
    }
}
