"""Test utilities shared by the test suite (tests/) and the benchmarks (bench/): small models and the zoo of
architectures whose channel groups are known exactly. Not part of any distribution."""
