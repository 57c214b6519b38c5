//! The shared store conformance suite on the in-memory store.

#[test]
fn memory_store_passes_the_conformance_suite() {
    idgraph_engine::conformance::run_all(idgraph_engine::MemoryStore::new);
}
