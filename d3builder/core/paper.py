"""The paper both tools follow (CoDE and D3, ECCV 2024): its link and citation, for the dataset and model cards."""

ARXIV_ID = "2407.20337"
PAPER_URL = f"https://arxiv.org/abs/{ARXIV_ID}"
TITLE = "Contrasting Deepfakes Diffusion via Contrastive Learning and Global-Local Similarities"
CITATION = f"""@inproceedings{{baraldi2024contrasting,
  title     = {{{TITLE}}},
  author    = {{Baraldi, Lorenzo and Cocchi, Federico and Cornia, Marcella and Baraldi, Lorenzo and Nicolosi, Alessandro and Cucchiara, Rita}},
  booktitle = {{Proceedings of the European Conference on Computer Vision (ECCV)}},
  year      = {{2024}}
}}"""
"""BibTeX of the paper (the two Lorenzo Baraldis are two authors)."""
