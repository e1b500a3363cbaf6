# an explicit keep in a "before" script
keep;
