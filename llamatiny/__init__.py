"""
llama-tiny's library: what the commands at the top level (tinystories.py, train.py, sample.py, eval.py,
export.py, plot.py, demo.py) are made of, beside model.py. One module per concern; README.md's file table
says what each holds.
"""
