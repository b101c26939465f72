//! The Merkle tree of a job attestation: RFC 9162 §2.1 (Certificate
//! Transparency v2) with SHA-256, so any RFC 9162 or RFC 6962 verifier
//! checks its inclusion proofs. Leaf hash = SHA-256(0x00 || leaf), node
//! hash = SHA-256(0x01 || left || right), the empty tree's hash is
//! SHA-256 of nothing, and a tree of n leaves splits at the largest power
//! of two below n.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The leaf of an item: its id (8 bytes, big-endian) || SHA-256 of the
/// value the job stored (README "Evidence for auditors" says what the
/// value is per scope).
pub fn leaf(item_id: i64, value_sha256: &Hash) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&item_id.to_be_bytes());
    out[8..].copy_from_slice(value_sha256);
    out
}

pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The tree hash over these leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The tree hash of leaves pushed one at a time, in O(log n) memory: the
/// complete subtrees so far, largest first (the binary digits of n), which
/// [`Builder::root`] joins right to left exactly as RFC 9162 splits.
#[derive(Debug, Default)]
pub struct Builder {
    stack: Vec<(u64, Hash)>,
}

impl Builder {
    pub fn push(&mut self, leaf_hash: Hash) {
        let mut node = (1u64, leaf_hash);
        while let Some(&(size, left)) = self.stack.last()
            && size == node.0
        {
            self.stack.pop();
            node = (size * 2, node_hash(&left, &node.1));
        }
        self.stack.push(node);
    }

    pub fn root(&self) -> Hash {
        let mut nodes = self.stack.iter().rev();
        let Some(&(_, mut acc)) = nodes.next() else {
            return Sha256::digest([]).into();
        };
        for (_, left) in nodes {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

/// The inclusion proof of leaf `m` (RFC 9162 §2.1.3.1), bottom up.
pub fn proof(leaves: &[Hash], m: usize) -> Vec<Hash> {
    assert!(m < leaves.len(), "leaf {m} of {}", leaves.len());
    let mut path = Vec::new();
    let (mut lo, mut hi, mut at) = (0, leaves.len(), m);
    // Walk down, recording the sibling subtree at each split; reversed at
    // the end so the proof runs from the leaf up.
    while hi - lo > 1 {
        let k = split(hi - lo);
        if at < k {
            path.push(root(&leaves[lo + k..hi]));
            hi = lo + k;
        } else {
            path.push(root(&leaves[lo..lo + k]));
            lo += k;
            at -= k;
        }
    }
    path.reverse();
    path
}

/// Whether `path` proves `leaf_hash` at `index` of a tree of `size`
/// leaves with this root (RFC 9162 §2.1.3.2).
pub fn verify(index: u64, size: u64, leaf_hash: &Hash, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in path {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(h: &Hash) -> String {
        crate::hex(h)
    }

    /// The test vectors of RFC 6962's reference implementation (Certificate
    /// Transparency's merkle_tree_test), whose hashing RFC 9162 keeps.
    #[test]
    fn roots_match_the_certificate_transparency_vectors() {
        let inputs: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let hashes: Vec<Hash> = inputs.iter().map(|d| leaf_hash(d)).collect();
        for (n, want) in roots.iter().enumerate() {
            assert_eq!(hex(&root(&hashes[..n + 1])), *want, "{} leaves", n + 1);
        }
        assert_eq!(
            hex(&root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn the_streaming_root_is_the_tree_hash_at_every_size() {
        let hashes: Vec<Hash> = (0u16..300).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut b = Builder::default();
        assert_eq!(b.root(), root(&[]));
        for n in 1..=hashes.len() {
            b.push(hashes[n - 1]);
            assert_eq!(b.root(), root(&hashes[..n]), "{n} leaves");
        }
    }

    #[test]
    fn every_proof_of_every_size_verifies_and_only_for_its_leaf() {
        let hashes: Vec<Hash> = (0u8..40).map(|i| leaf_hash(&[i])).collect();
        for n in 1..=hashes.len() {
            let r = root(&hashes[..n]);
            for m in 0..n {
                let p = proof(&hashes[..n], m);
                assert!(verify(m as u64, n as u64, &hashes[m], &p, &r), "{m} of {n}");
                let other = leaf_hash(b"not a leaf");
                assert!(!verify(m as u64, n as u64, &other, &p, &r), "{m} of {n}");
                if n > 1 {
                    let wrong = (m + 1) % n;
                    assert!(
                        !verify(wrong as u64, n as u64, &hashes[m], &p, &r),
                        "{m} of {n}"
                    );
                }
            }
        }
    }
}
