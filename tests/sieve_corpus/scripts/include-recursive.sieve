# RFC 6609 3.2: an include loop is an error
require ["include", "fileinto"];
fileinto "BeforeLoop";
include :personal "loop";
