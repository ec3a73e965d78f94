"""Data: readers of the file formats (``records``) and the data-set formats (``formats``), loading with bad-row
accounting (``load``), (prompt, response) pairs (``pairs``), prompt-grouped splits (``split``), tokenisation with exact
response masks (``tokenization``), the example stream and random answers (``sampling``), what one step reads
(``step_data``), and tiny local models and tokenizers for tests and demos (``tiny``).

May import ``dsunlearn.settings`` only.
"""
