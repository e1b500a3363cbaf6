# RFC 6609 3.2: include :personal, return ends only the included script
require ["include", "fileinto"];
include :personal "lists";
fileinto "AfterInclude";
