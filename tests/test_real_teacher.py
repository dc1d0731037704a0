"""The real-teacher check on SmolLM2-135M (GGUF): Minitron MLP pruning beats random pruning by far.

Reference (../shared/data/README.md): teacher 29.6, importance-pruned 74, random 972 (16 x 512 windows).
"""

import torch
from transformers import AutoModelForCausalLM

from hf_minitron.data import TextSource, pack_tokens, token_windows
from hf_minitron.evaluate import perplexity
from hf_minitron.importance import ImportanceConfig, ImportanceScores, compute_importance
from hf_minitron.models import load_model, load_tokenizer, resolve_source
from hf_minitron.prune import PruneTarget, prune_model, save_student


def test_smollm2_mlp_pruning_beats_random(smollm2_path, shared_data, tmp_path):
    source = resolve_source(str(smollm2_path))
    tokenizer = load_tokenizer(source)
    teacher = load_model(source)
    calib = TextSource(f"{shared_data}/tinyshakespeare.txt,{shared_data}/wikitext2_valid.txt")
    packed = pack_tokens(calib, tokenizer, samples=32, seq_len=256)
    assert packed.input_ids.shape == (32, 256)
    scores = compute_importance(teacher, packed.input_ids, ImportanceConfig(depth_ppl_samples=0),
                                {"data": packed.source}, progress=False)
    scores.save(tmp_path / "scores")
    scores = ImportanceScores.load(tmp_path / "scores")

    student, _ = prune_model(teacher, scores, PruneTarget(ffn_size=1024))
    save_student(student, tmp_path / "student", tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.config.intermediate_size == 1024 and reloaded.num_parameters() == 107_972_928

    random_scores = ImportanceScores(dict(scores.tensors), scores.meta)
    random_scores.tensors["neurons"] = torch.rand(scores.tensors["neurons"].shape,
                                                  generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    random_student, _ = prune_model(teacher, random_scores, PruneTarget(ffn_size=1024))

    windows = token_windows(f"{shared_data}/wikitext2_test.txt", tokenizer, 512, 16)
    ppl_teacher = perplexity(teacher, windows)
    ppl_pruned = perplexity(reloaded, windows)
    ppl_random = perplexity(random_student, windows)
    print(f"teacher {ppl_teacher:.1f}  importance {ppl_pruned:.1f}  random {ppl_random:.1f}")
    assert 25 < ppl_teacher < 35
    assert ppl_pruned < 3 * ppl_teacher
    assert ppl_pruned < ppl_random / 5
