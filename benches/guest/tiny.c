/* The smallest static program: exit(0) with no libc (one page of code). */
void _start(void) { __asm__ volatile("mov $60, %eax; xor %edi, %edi; syscall"); }
