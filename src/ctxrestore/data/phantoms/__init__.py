"""data/phantoms"""
