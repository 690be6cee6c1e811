"""cluster.yaml passes Ray's own (offline) cluster-config validation; a misspelt key is rejected."""
import copy

import pytest
import yaml
from jsonschema.exceptions import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config


def load():
    return yaml.safe_load(open("cluster.yaml"))


def test_cluster_yaml_is_valid_and_keeps_dashboard_on_loopback():
    cfg = load()
    validate_config(prepare_config(copy.deepcopy(cfg)))
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd


def test_invalid_cluster_yaml_is_rejected():
    bad = load()
    bad["available_node_types"]["head"]["node_cfg"] = bad["available_node_types"]["head"].pop("node_config")
    with pytest.raises(ValidationError):
        validate_config(prepare_config(bad))
