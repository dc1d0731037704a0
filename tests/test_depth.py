"""Depth scores on a dispatched model: states and logits come from the devices of their layers (the meta device
stands in for a second accelerator here; it fails every mixed-device op the way a second GPU does)."""
import torch

from hf_minitron.depth import add_block_importance, nll_sum


def test_block_importance_gathers_states_from_several_devices_onto_the_sums_device():
    bi_sum = torch.zeros(1, 2, dtype=torch.float64, device="meta")
    states = [torch.randn(1, 4, 8), torch.randn(1, 4, 8, device="meta"), torch.randn(1, 4, 8)]
    add_block_importance(bi_sum, states, max_run=1)
    assert bi_sum.device.type == "meta"


def test_nll_sum_takes_its_targets_to_the_logits_device():
    logits = torch.randn(2, 5, 11, device="meta")
    batch = torch.randint(0, 11, (2, 5))
    assert nll_sum(logits, batch).device.type == "meta"


def test_nll_sum_is_the_summed_next_token_cross_entropy():
    logits, batch = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), batch[:, 1:].reshape(-1),
                                                 reduction="sum")
    assert torch.allclose(nll_sum(logits, batch), expected.double())

