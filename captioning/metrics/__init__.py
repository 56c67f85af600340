"""Caption metrics over text (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE) and the CIDEr-D reward."""
