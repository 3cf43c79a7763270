"""The sample files of ../shared/spec/SPEC.md (sections 2, 3 and 6), as the reference writes them."""

SPEC_SEARCH_CONFIG = """\
compress_ratio: 1.5
ascend_optimized: true
max_prune_ratio: 0.8
test_iteration: 1
override_prune_cfg: 'your/path/to/override_channel_prune.cfg'
"""

SPEC_PRUNE_CONFIG = """\
override_layer_configs {
  layer_name: "layer2.0.conv1"
  prune_config {
    filter_pruner {
      balanced_l2_norm_filter_prune {
        prune_ratio: 0.5
        ascend_optimized: true
      }
    }
  }
}
prune_config {
  filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: true } }
}
regular_prune_skip_layers: "layer1.0.conv1"
"""

SPEC_RECORD = """\
prune_record {
  producer { name: "layer1.0" attr { name: "type" type: STRING s: "Conv" } attr { name: "begin" type: INT i: 0 } attr { name: "end" type: INT i: 64 } }
  consumer { name: "layer1.1" attr { name: "type" type: STRING s: "BatchNormalization" } attr { name: "begin" type: INT i: 0 } attr { name: "end" type: INT i: 64 } }
  consumer { name: "layer2.0" attr { name: "type" type: STRING s: "Conv" } attr { name: "begin" type: INT i: 0 } attr { name: "end" type: INT i: 64 } }
}
"""  # noqa: E501 - SPEC's sample, one line per node as written there
