# RFC 6609 3.2: a missing script without :optional is an error
require ["include", "fileinto"];
fileinto "BeforeMissing";
include :personal "does-not-exist";
